# syntax=docker/dockerfile:1
# conversion-gateway (and fake-x-api, for local stacks) in a distroless, shell-less, non-root image.
#   docker build -t conversion-gateway .
#   docker run --read-only -v cg-spool:/var/lib/conversion-gateway -p 8080:8080 -p 9090:9090 conversion-gateway
# The process writes only under /var/lib/conversion-gateway (the spool): a read-only root file system works.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
RUN cargo build --release --locked --bin conversion-gateway --bin fake-x-api
# The spool directory, owned by the runtime user, for the volume to start from (distroless has no shell
# to create it in the final stage).
RUN install -d -o 65532 -g 65532 -m 0750 /spool

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/conversion-gateway /usr/local/bin/conversion-gateway
COPY --from=build /src/target/release/fake-x-api /usr/local/bin/fake-x-api
COPY --from=build --chown=65532:65532 /spool /var/lib/conversion-gateway
COPY config/ /etc/conversion-gateway/
ENV GATEWAY_SPOOL__DIR=/var/lib/conversion-gateway \
    GATEWAY_SERVER__LISTEN=0.0.0.0:8080 \
    GATEWAY_SERVER__ADMIN_LISTEN=0.0.0.0:9090 \
    GATEWAY_LOG__FORMAT=json
VOLUME /var/lib/conversion-gateway
USER 65532:65532
EXPOSE 8080 9090
# No curl in the image: the binary asks its own admin listener (/readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/conversion-gateway", "--config", "/etc/conversion-gateway/local.toml", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/conversion-gateway"]
CMD ["--config", "/etc/conversion-gateway/local.toml"]

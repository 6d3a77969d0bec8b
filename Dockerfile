# syntax=docker/dockerfile:1
# Multi-stage build: a release build, then a distroless, shell-less, non-root runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
RUN cargo build --release --locked --bin conversion-gateway --bin fake-x-api

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/conversion-gateway /usr/local/bin/conversion-gateway
COPY --from=build /src/target/release/fake-x-api /usr/local/bin/fake-x-api
COPY config/ /etc/conversion-gateway/
ENV GATEWAY_SPOOL__DIR=/var/lib/conversion-gateway \
    GATEWAY_SERVER__LISTEN=0.0.0.0:8080 \
    GATEWAY_SERVER__ADMIN_LISTEN=0.0.0.0:9090
VOLUME /var/lib/conversion-gateway
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/conversion-gateway"]
CMD ["--config", "/etc/conversion-gateway/local.toml"]

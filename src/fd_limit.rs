//! Whether the process's open-file limit leaves room for the connections it is configured to take.
//!
//! Each connection is a file descriptor; so are the spool's files, the Redis and X connections and the
//! logs. A `server.max_connections` above what the limit leaves would let a flood of clients take the
//! descriptors the spool needs, which is what the connection limit exists to prevent: the gateway says
//! so at start-up. The limit is read from `/proc/self/limits` (no system call to wrap, so no `unsafe`).

/// Descriptors kept for everything but the two listeners' connections.
pub const RESERVE: u64 = 256;

/// The soft "Max open files" limit in the text of `/proc/self/limits`; `None` when unlimited or absent.
pub fn soft_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `Some(warning)` when `connections` (both listeners') plus `RESERVE` exceed `limit`.
pub fn shortfall(connections: u64, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    (connections + RESERVE > limit).then(|| {
        format!(
            "server.max_connections and the admin listener's room ({connections} connections) plus {RESERVE} descriptors for the spool, Redis, X and logs exceed this process's open-file limit ({limit}): raise it (ulimit -n, the container's nofile) or lower server.max_connections, or a flood of clients can starve the spool"
        )
    })
}

/// The warning for this process, if any.
pub fn check(connections: u64) -> Option<String> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    shortfall(connections, soft_limit(&limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 1048576              files     \n";

    #[test]
    fn the_soft_limit_is_read_and_compared() {
        assert_eq!(soft_limit(LIMITS), Some(1024));
        assert_eq!(soft_limit("Max open files unlimited unlimited files"), None);
        assert_eq!(soft_limit(""), None);
        let warning = shortfall(4096 + 256, Some(1024)).unwrap();
        assert!(
            warning.contains("1024") && warning.contains("server.max_connections"),
            "{warning}"
        );
        assert_eq!(shortfall(512, Some(1024)), None);
        assert_eq!(shortfall(1 << 20, None), None);
    }
}

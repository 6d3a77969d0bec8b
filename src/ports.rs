//! Free local TCP ports, for the tests and the benchmark that start servers of their own.
//!
//! The operating system may hand the same ephemeral port to two binds made one after the other once the
//! first is closed; a test asking for a fake's port and then the gateway's got the same one twice (seen in
//! a fresh-clone CI run: "cannot listen … Address already in use"). Ports handed out here are remembered
//! for the process's life and never handed out again.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port nothing listens on now and that this process was not given before.
pub fn free_port() -> u16 {
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free local port");
        if given.insert(port) {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_the_same_port_twice() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_port()).collect();
        let distinct: std::collections::HashSet<&u16> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}

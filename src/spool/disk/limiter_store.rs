//! The limiter's state in the spool's file: one TAT per budget key in `meta`, saved by the storage
//! thread in its own transaction (committed before `save` answers), loaded at start-up. A seam of its own
//! (`limiter::LimiterState`): the limiter never sees the spool.

use super::call;
use super::counters::{lock, Shared};
use super::protocol::{Cmd, Op};
use crate::limiter::{LimiterState, Nanos};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

pub struct DiskLimiterState {
    pub(super) tx: std_mpsc::Sender<Cmd>,
    pub(super) shared: Arc<Mutex<Shared>>,
}

impl LimiterState for DiskLimiterState {
    fn load(&self, key: &str) -> Option<Nanos> {
        lock(&self.shared).tats.get(key).copied()
    }

    fn save<'a>(&'a self, key: &'a str, tat: Nanos) -> BoxFuture<'a, Result<(), String>> {
        async move {
            call(&self.tx, |reply| {
                Cmd::Write(Op::SaveTat {
                    key: key.to_owned(),
                    tat,
                    reply,
                })
            })
            .await
            .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

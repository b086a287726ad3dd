//! Per-core fetch tables. The shard that owns an info-hash (`store::shard_of(key,
//! workers)`) runs its one fetch, however many clients on however many cores wait for it.
//! Sessions reach the owner through its mailbox (one cross-core message per miss).

use std::sync::Arc;

use crate::store::{RecordRef, Store};
use crate::upstream::config::UpstreamConfig;
use crate::upstream::PeerCandidate;

/// Why a fetch did not produce metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchFailure {
    /// The hash failed recently; not retried until the negative cache entry expires.
    NegativeCached,
    /// A bound on upstream work refused to start a fetch (named by the string).
    Refused(&'static str),
    /// The fetch ran and ended without verified metadata.
    Failed(String),
}

/// What a waiting client learns.
#[derive(Clone, Debug)]
pub enum FetchOutcome {
    Ready(RecordRef),
    Failed(FetchFailure),
}

/// Messages to the owning shard of an info-hash.
pub enum ShardCmd {
    /// Start (or join) the fetch of `key`; the outcome is sent to `waiter`.
    Join {
        key: [u8; 20],
        hints: Vec<PeerCandidate>,
        waiter: flume::Sender<FetchOutcome>,
    },
    /// More peers for a running fetch (PEX from a waiting client).
    Peers {
        key: [u8; 20],
        peers: Vec<PeerCandidate>,
    },
}

/// Shared by all workers: the mailboxes of every shard and what fetches need.
pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub store: Arc<Store>,
    mailboxes: Vec<flume::Sender<ShardCmd>>,
}

impl Upstream {
    /// One mailbox per worker; each worker runs `run_shard` with its receiver.
    pub fn new(
        cfg: UpstreamConfig,
        store: Arc<Store>,
        workers: usize,
    ) -> (Arc<Upstream>, Vec<flume::Receiver<ShardCmd>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..workers.max(1)).map(|_| flume::unbounded()).unzip();
        (
            Arc::new(Upstream {
                cfg,
                store,
                mailboxes: tx,
            }),
            rx,
        )
    }

    pub fn owner(&self, key: &[u8; 20]) -> usize {
        crate::store::shard_of(key, self.mailboxes.len())
    }

    pub fn send(&self, key: &[u8; 20], cmd: ShardCmd) {
        // A closed mailbox means the worker is gone (shutdown); the waiter sees its
        // sender dropped and closes.
        let _ = self.mailboxes[self.owner(key)].send(cmd);
    }
}

/// The owning side of one shard; runs on worker `index`'s runtime until shutdown.
pub async fn run_shard(index: usize, rx: flume::Receiver<ShardCmd>, upstream: Arc<Upstream>) {
    let _ = (index, &upstream);
    while let Ok(cmd) = rx.recv_async().await {
        if let ShardCmd::Join { waiter, .. } = cmd {
            let _ = waiter.send(FetchOutcome::Failed(FetchFailure::Refused(
                "miss path not built yet",
            )));
        }
    }
}

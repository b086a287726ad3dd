//! Process lifecycle around the workers: signals and the systemd watchdog.
//!
//! Signals are blocked in every thread (the mask is set before the first thread starts and
//! inherited) and taken synchronously by the main thread with `sigtimedwait`, so there is no
//! signal handler and nothing async-signal-safe to get right. SIGTERM / SIGINT: stop
//! (`Server::shutdown`); SIGHUP: reload (blocklist, log filter).
//!
//! Watchdog (`WatchdogSec=` in the unit): `WATCHDOG=1` is sent only while every worker's
//! heartbeat counter (a 1 s timer on its runtime) keeps advancing, so a core whose runtime
//! is wedged gets the service restarted instead of silently dropping its share of
//! connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stats::CoreStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT (named).
    Stop(&'static str),
    /// SIGHUP.
    Reload,
}

pub struct Signals {
    set: libc::sigset_t,
}

/// Block SIGTERM, SIGINT and SIGHUP in this thread and every thread it starts afterwards.
/// Call before any thread is spawned.
pub fn block_signals() -> Signals {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only reads
    // it. Blocking signals has no memory-safety effect.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        assert_eq!(rc, 0, "pthread_sigmask");
        Signals { set }
    }
}

impl Signals {
    /// The next signal, or `None` once `timeout` passes (`None`: wait for ever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Signal> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return None;
            }
            // Long waits are cut in pieces so a `None` timeout needs no special case.
            let slice = left.unwrap_or(Duration::from_secs(3600));
            let ts = libc::timespec {
                tv_sec: slice.as_secs() as libc::time_t,
                tv_nsec: slice.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `self.set` is a valid, initialised signal set; siginfo may be null.
            let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
            match sig {
                libc::SIGTERM => return Some(Signal::Stop("SIGTERM")),
                libc::SIGINT => return Some(Signal::Stop("SIGINT")),
                libc::SIGHUP => return Some(Signal::Reload),
                _ => {
                    // -1: EAGAIN (the slice ran out) or EINTR; go round and re-check.
                    if deadline.is_none() && sig == -1 {
                        continue;
                    }
                }
            }
        }
    }
}

/// If systemd asked for a watchdog (`WATCHDOG_USEC`), start a thread that pings it while
/// every worker's heartbeat advances.
pub fn start_watchdog(cores: Vec<Arc<CoreStats>>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    // A worker may miss its tick by up to one period before we stop vouching for it.
    let stale_after = period.max(Duration::from_secs(3));
    let every = (period / 3).max(Duration::from_millis(100));
    let spawned = std::thread::Builder::new()
        .name("magnetar-watchdog".into())
        .spawn(move || {
            let mut seen: Vec<(u64, Instant)> = cores
                .iter()
                .map(|c| (c.heartbeats.get(), Instant::now()))
                .collect();
            loop {
                let now = Instant::now();
                let mut all_alive = true;
                for (core, (last, at)) in cores.iter().zip(seen.iter_mut()) {
                    let beat = core.heartbeats.get();
                    if beat != *last {
                        *last = beat;
                        *at = now;
                    } else if now.duration_since(*at) > stale_after {
                        all_alive = false;
                    }
                }
                if all_alive {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("a worker's heartbeat stopped; not feeding the watchdog");
                }
                std::thread::sleep(every);
            }
        });
    match spawned {
        Ok(_) => tracing::info!(?period, "systemd watchdog enabled"),
        Err(e) => tracing::error!("cannot start the watchdog thread: {e}"),
    }
}

//! A thread of its own with a current-thread tokio runtime, for the tokio-based parts
//! (the admin plane's axum, the shared tier's object_store): they never run on, or wait
//! behind, the serving cores.

use std::future::Future;

/// Blocking-pool threads per runtime: store writes (fsync) and index walks run there.
const BLOCKING_THREADS_MAX: usize = 4;

/// Spawns thread `name` running the future `make` builds there, to its end. A runtime
/// that cannot be built is logged and the thread ends.
pub fn spawn<F, Fut>(name: &str, make: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let label = name.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS_MAX)
                .build()
            {
                Ok(rt) => rt.block_on(make()),
                Err(e) => tracing::error!("{label}: cannot build its runtime: {e}"),
            }
        })
}

//! Debian's `transmission-cli` (Transmission 3) run inside a test network namespace: start
//! it on a magnet with a settings file, read its log, find the metadata it wrote. Shared
//! by `interop_transmission.rs` and `dht_node.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::Netns;

pub fn require_transmission() {
    assert!(
        Path::new("/usr/bin/transmission-cli").exists(),
        "transmission-cli is missing: run `bash scripts/test.sh`, which installs it"
    );
}

/// A `transmission-cli` inside a namespace; killed on drop (panics included).
pub struct Transmission {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Drop for Transmission {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Transmission {
    /// Starts `transmission-cli -g DIR/config -w DIR/download MAGNET` inside `ns` with
    /// `settings` as its settings.json and `files` (name, contents) beside it in the config
    /// directory; its output, with libtransmission's deep log (TR_DEBUG_FD) and `env`,
    /// goes to `DIR/log`.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        magnet: &str,
        settings: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Transmission {
        let config = dir.join("config");
        let download = dir.join("download");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::create_dir_all(&download).unwrap();
        std::fs::write(config.join("settings.json"), settings).unwrap();
        for (name, contents) in files {
            std::fs::write(config.join(name), contents).unwrap();
        }
        let log = dir.join("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = ns
            .command("transmission-cli")
            .arg("-g")
            .arg(&config)
            .arg("-w")
            .arg(&download)
            .arg(magnet)
            .env("TR_DEBUG_FD", "2")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning transmission-cli in the namespace");
        Transmission { child, config, log }
    }

    /// Its output so far.
    pub fn read_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last `lines` lines of its output without libtransmission's I/O accounting
    /// (bandwidth.c, peer-io.c), last line first: what a failure message shows.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.read_log();
        let tail: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("bandwidth.c") && !l.contains("peer-io.c"))
            .rev()
            .take(lines)
            .collect();
        tail.join("\n")
    }

    /// The info dict of the .torrent it writes into `config/torrents` once it has the
    /// metadata (before that, the file it keeps for a magnet has no `info`).
    pub fn written_info(&self) -> Option<Vec<u8>> {
        let dir = std::fs::read_dir(self.config.join("torrents")).ok()?;
        for entry in dir.flatten() {
            let bytes = std::fs::read(entry.path()).ok()?;
            if let Ok(span) = magnetar::metainfo::info_span(&bytes) {
                return Some(bytes[span].to_vec());
            }
        }
        None
    }
}

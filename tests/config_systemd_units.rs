//! `systemd/magnetar.service`, `magnetar.socket` and `magnetar-http.socket` pass
//! `systemd-analyze verify`, and the service keeps an exposure score of 2.0 or lower
//! (`systemd-analyze security`). Both run offline, so
//! this works without systemd as PID 1 (CI containers). `systemd-analyze` comes from
//! Debian's `systemd` package, which `scripts/test.sh` installs.

use std::path::Path;
use std::process::Command;

const EXPOSURE_MAX: f64 = 2.0;

fn systemd_analyze() -> &'static str {
    let p = "/usr/bin/systemd-analyze";
    assert!(
        Path::new(p).exists(),
        "systemd-analyze is missing: run `bash scripts/test.sh`, which installs systemd"
    );
    p
}

/// The units with ExecStart pointing at the binary under test (verify checks it exists).
fn units_in(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = std::fs::read_to_string(src.join("magnetar.service"))
        .unwrap()
        .replace("/usr/local/bin/magnetar", env!("CARGO_BIN_EXE_magnetar"));
    let (svc, sock) = (dir.join("magnetar.service"), dir.join("magnetar.socket"));
    std::fs::write(&svc, service).unwrap();
    std::fs::copy(src.join("magnetar.socket"), &sock).unwrap();
    let http = dir.join("magnetar-http.socket");
    std::fs::copy(src.join("magnetar-http.socket"), &http).unwrap();
    (svc, sock, http)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, sock, http) = units_in(dir.path());
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(&svc)
        .arg(&sock)
        .arg(&http)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify warns (exit 0) about unknown settings and syscall groups: none allowed.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("magnetar.") || l.contains("magnetar-http."))
        .collect();
    assert!(
        ours.is_empty(),
        "warnings about our units:\n{}",
        ours.join("\n")
    );
}

#[test]
fn service_exposure_score_is_at_most_2() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, _, _) = units_in(dir.path());
    let out = Command::new(systemd_analyze())
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&svc)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for magnetar.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(
        score <= EXPOSURE_MAX,
        "exposure {score} > {EXPOSURE_MAX}:\n{text}"
    );
}

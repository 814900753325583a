//! A full /dev/shm: creating a segment larger than the space left fails at creation with an error
//! that names the volume to enlarge — not with a SIGBUS on the first write later.
//!
//! Runs the helper inside a new mount namespace (`unshare -rm`, util-linux) over a private 256 KiB
//! tmpfs, so nothing outside the test is touched.

use std::process::Command;

const PEER: &str = env!("CARGO_BIN_EXE_shmback-test-peer");

#[test]
fn a_full_tmpfs_is_a_clear_error_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().display().to_string();
    // After the attempt, list the tmpfs: a failed creation must leave nothing behind (no segment,
    // no temporary file).
    let script = format!(
        "mount -t tmpfs -o size=256k shmback-test {mnt} && {{ {PEER} create {mnt}/seg 1048576; rc=$?; \
         echo left:; ls -A {mnt}; exit $rc; }}"
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) runs: it is part of every Debian base system");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("mount:") && !stderr.contains("unshare:"),
        "could not set up the private tmpfs (needs user+mount namespaces): {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "creation should fail; stderr: {stderr}");
    assert!(stderr.contains("not enough room"), "{stderr}");
    assert!(stderr.contains("--shm-size") && stderr.contains("sizeLimit"), "the fix is named: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), "left:", "files left in the full tmpfs: {stdout}");
}

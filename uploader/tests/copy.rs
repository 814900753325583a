//! `shmback copy --to REPO2`: snapshots copied between two local repositories with different
//! passwords restore byte-exact from the target; a second copy copies nothing (matched by the
//! original id the copies carry) and adds no data; filters (host, tag, ids) pick what is copied;
//! a missing target is named (and created with `--init-target`), a wrong target password too.

mod common;

use std::path::Path;
use std::process::Output;

use common::{PW, fresh_repo, noise, send_batches, shmback, text};
use shmback_writer::Batch;

/// The target's password (the source's is [`PW`]).
const PW2: &str = "another-password";

/// `shmback copy --to TARGET ARGS` from `source` (password [`PW`]), the target's password in
/// SHMBACK_TO_PASSWORD.
fn copy(source: &str, target: &Path, args: &[&str]) -> Output {
    let mut all = vec!["copy", "--to", target.to_str().unwrap()];
    all.extend_from_slice(args);
    shmback(Path::new(source), &all, &[("RESTIC_PASSWORD", PW), ("SHMBACK_TO_PASSWORD", PW2)])
}

/// `shmback ARGS` on the target with its password.
fn on_target(target: &Path, args: &[&str]) -> Output {
    shmback(target, args, &[("RESTIC_PASSWORD", PW2)])
}

/// Files under `dir` (recursively), for counting packs.
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 }
            })
            .sum()
        })
        .unwrap_or(0)
}

fn batch(host: &'static str, tag: &'static str, name: &'static str, data: Vec<u8>) -> Box<dyn FnOnce(&mut Batch<'_>)> {
    Box::new(move |b: &mut Batch<'_>| {
        b.add_bytes(name, data).unwrap();
        b.add_bytes("shared/common.bin", noise(1, 700_000)).unwrap();
        b.host(host).tag(tag);
    })
}

#[test]
fn copies_to_a_repository_with_another_password_once_and_restores_byte_exact() {
    let (dir, source) = fresh_repo();
    let a = noise(2, 1_500_000);
    let b = noise(3, 900_000);
    let ids = send_batches(
        &source,
        vec![batch("web", "daily", "data/a.bin", a.clone()), batch("web", "daily", "data/b.bin", b.clone())],
    );
    let target = dir.path().join("target");
    let o = on_target(&target, &["init"]);
    assert!(o.status.success(), "{}", text(&o));

    let o = copy(&source, &target, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 snapshots selected, 0 already in"), "{}", text(&o));
    assert!(text(&o).contains("2 copied"), "{}", text(&o));
    for id in &ids {
        assert!(text(&o).contains(&format!("copied {}", &id[..8])), "{id} is listed as copied:\n{}", text(&o));
    }
    // The target lists them (with its own password), each naming its original.
    let o = on_target(&target, &["snapshots", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let snaps: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut originals: Vec<String> =
        snaps.as_array().unwrap().iter().map(|s| s["original"].as_str().unwrap().to_string()).collect();
    originals.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(originals, want);
    // The source's password does not open the target: the keys are the target's own.
    let o = shmback(&target, &["snapshots"], &[("RESTIC_PASSWORD", PW)]);
    assert!(!o.status.success(), "{}", text(&o));

    // Restored from the target, byte for byte; and the target checks clean.
    let dest = dir.path().join("restored");
    let o = on_target(&target, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("data/b.bin")).unwrap(), b);
    assert_eq!(std::fs::read(dest.join("shared/common.bin")).unwrap(), noise(1, 700_000));
    let first = dir.path().join("first");
    let o = on_target(&target, &["restore", &ids[0][..8], first.to_str().unwrap()]);
    assert!(!o.status.success(), "a source id is not a target id:\n{}", text(&o));
    let o = on_target(&target, &["check", "--read-data"]);
    assert!(o.status.success(), "{}", text(&o));

    // Again: nothing to copy, no new data, no new snapshot.
    let packs = count_files(&target.join("data"));
    let o = copy(&source, &target, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 snapshots selected, 2 already in"), "{}", text(&o));
    assert!(text(&o).contains(", 0 copied"), "{}", text(&o));
    assert_eq!(count_files(&target.join("data")), packs);
    assert_eq!(count_files(&target.join("snapshots")), 2);
}

#[test]
fn filters_pick_what_is_copied_and_the_rest_follows_later() {
    let (dir, source) = fresh_repo();
    let ids = send_batches(
        &source,
        vec![
            batch("db", "nightly", "db/dump.sql", noise(4, 300_000)),
            batch("db", "hourly", "db/dump.sql", noise(5, 300_000)),
            batch("web", "nightly", "www/index.html", noise(6, 300_000)),
        ],
    );
    let target = dir.path().join("target");
    // No repository there: named, with the way out.
    let o = copy(&source, &target, &["--host", "db"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("there is no repository at") && text(&o).contains("--init-target"), "{}", text(&o));

    // Host db and tag nightly: the first snapshot only; the target is created on the way.
    let o = copy(&source, &target, &["--init-target", "--host", "db", "--tag", "nightly"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("created repository"), "{}", text(&o));
    assert!(text(&o).contains("1 snapshots selected, 0 already in") && text(&o).contains(", 1 copied"), "{}", text(&o));
    assert!(text(&o).contains(&format!("copied {}", &ids[0][..8])), "{}", text(&o));

    // By id prefix: the third; the first is not asked for.
    let o = copy(&source, &target, &[&ids[2][..8]]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 snapshots selected, 0 already in") && text(&o).contains(", 1 copied"), "{}", text(&o));
    assert!(text(&o).contains(&format!("copied {}", &ids[2][..8])), "{}", text(&o));

    // Tag groups: any of them; what is there already is skipped.
    let o = copy(&source, &target, &["--tag", "hourly", "--tag", "nightly"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("3 snapshots selected, 2 already in") && text(&o).contains(", 1 copied"), "{}", text(&o));
    assert!(text(&o).contains(&format!("copied {}", &ids[1][..8])), "{}", text(&o));

    let o = on_target(&target, &["snapshots"]);
    assert!(text(&o).contains("3 snapshots"), "{}", text(&o));
    let dest = dir.path().join("restored");
    let o = on_target(&target, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("www/index.html")).unwrap(), noise(6, 300_000));
    let o = on_target(&target, &["check", "--read-data"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn the_target_password_is_checked_and_its_errors_name_the_target() {
    let (dir, source) = fresh_repo();
    let target = dir.path().join("target");
    let o = on_target(&target, &["init"]);
    assert!(o.status.success(), "{}", text(&o));
    // None given.
    let o = shmback(Path::new(&source), &["copy", "--to", target.to_str().unwrap()], &[("RESTIC_PASSWORD", PW)]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no password for the target repository") && text(&o).contains("SHMBACK_TO_PASSWORD"),
        "{}",
        text(&o)
    );
    // A wrong one.
    let o = shmback(
        Path::new(&source),
        &["copy", "--to", target.to_str().unwrap()],
        &[("RESTIC_PASSWORD", PW), ("SHMBACK_TO_PASSWORD", "wrong")],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong password") && text(&o).contains(target.to_str().unwrap()), "{}", text(&o));
    // A file that is not there.
    let missing = dir.path().join("missing");
    let o = shmback(
        Path::new(&source),
        &["copy", "--to", target.to_str().unwrap(), "--to-password-file", missing.to_str().unwrap()],
        &[("RESTIC_PASSWORD", PW)],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot read the target password file"), "{}", text(&o));
    // From a command, it works (nothing to copy from an empty source).
    let o = shmback(
        Path::new(&source),
        &["copy", "--to", target.to_str().unwrap(), "--to-password-command", &format!("echo {PW2}")],
        &[("RESTIC_PASSWORD", PW)],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 snapshots selected"), "{}", text(&o));
}

//! A damaged repository: a pack with corrupted bytes, lost index files, a lost pack. Restore
//! restores what it can, names what it cannot and leaves no file looking complete; `check
//! --read-data` names the damaged pack and the repair; `repair index` and `repair snapshots`
//! bring the repository back to a clean check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Fill, fresh_repo, noise, send_batches, shmback_pw as shmback, text};

const BIG: usize = 3 << 20;

/// A repository holding two snapshots: `keep/good.txt` alone, then `keep/good.txt` (the same
/// blob, deduplicated) with `big.bin` (3 MiB of its own data, in its own pack). Returns the
/// directory (kept alive) and the location.
fn two_snapshots() -> (tempfile::TempDir, String) {
    let (dir, loc) = fresh_repo();
    let first: Fill = Box::new(|b| b.add_bytes("keep/good.txt", noise(1, 5000)).unwrap());
    let second: Fill = Box::new(|b| {
        b.add_bytes("keep/good.txt", noise(1, 5000)).unwrap();
        b.add_bytes("big.bin", noise(2, BIG)).unwrap();
    });
    send_batches(&loc, vec![first, second]);
    (dir, loc)
}

/// The files under `repo/<sub>`, largest first.
fn files(repo: &str, sub: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![Path::new(repo).join(sub)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    out
}

/// The pack holding `big.bin` (by far the largest) and its id.
fn big_pack(repo: &str) -> (PathBuf, String) {
    let packs = files(repo, "data");
    let big = packs[0].clone();
    assert!(std::fs::metadata(&big).unwrap().len() > (BIG as u64) / 2, "{packs:?}");
    let id = big.file_name().unwrap().to_str().unwrap().to_string();
    (big, id)
}

/// Overwrites 64 bytes in the middle of `pack` (inside a blob: its MAC fails).
fn corrupt(pack: &Path) {
    let mut data = std::fs::read(pack).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 64] {
        *b ^= 0x5a;
    }
    // Pack files are written read-only.
    let mut perm = std::fs::metadata(pack).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(pack, perm).unwrap();
    std::fs::write(pack, data).unwrap();
}

#[test]
fn a_damaged_pack_fails_its_files_only_and_leaves_no_zero_filled_file() {
    let (dir, repo) = two_snapshots();
    let (pack, pack_id) = big_pack(&repo);
    corrupt(&pack);

    let dest = dir.path().join("dest");
    let o = shmback(&repo, &["restore", "latest", dest.to_str().unwrap()]);
    let out = text(&o);
    assert_ne!(o.status.code(), Some(101), "restore panicked:\n{out}");
    assert!(!o.status.success(), "a restore missing a file must fail:\n{out}");
    assert!(out.contains("big.bin"), "the damaged file is not named:\n{out}");
    assert!(out.contains(&pack_id), "the damaged pack is not named:\n{out}");
    assert!(out.contains("check --read-data"), "no next step given:\n{out}");
    // The rest is restored; the damaged file is not left full-size with zeros in it.
    assert_eq!(std::fs::read(dest.join("keep/good.txt")).unwrap(), noise(1, 5000));
    assert!(!dest.join("big.bin").exists(), "the damaged file was left in place");

    // The same for a single-file restore.
    let one = dir.path().join("one/big.bin");
    let o = shmback(&repo, &["restore", "latest:/big.bin", one.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(101), "restore panicked:\n{}", text(&o));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!one.exists(), "the damaged single file was left in place");
}

#[test]
fn check_read_data_names_the_damaged_pack_and_the_repair() {
    let (_dir, repo) = two_snapshots();
    let o = shmback(&repo, &["check", "--read-data"]);
    assert!(o.status.success(), "{}", text(&o));
    let (pack, pack_id) = big_pack(&repo);
    corrupt(&pack);

    let o = shmback(&repo, &["check", "--read-data"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains(&format!("damaged pack(s): {pack_id}")), "pack not named:\n{out}");
    assert!(out.contains("cannot be decrypted"), "the finding does not say what is wrong:\n{out}");
    assert!(out.contains("shmback repair index") && out.contains("shmback repair snapshots"), "{out}");
    // Without --read-data the pack's bytes are not read: the structure is fine.
    let o = shmback(&repo, &["check"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn repair_index_rebuilds_a_lost_index_from_the_packs() {
    let (dir, repo) = two_snapshots();
    let index = files(&repo, "index");
    assert!(!index.is_empty());
    for f in &index {
        std::fs::remove_file(f).unwrap();
    }
    let o = shmback(&repo, &["check"]);
    assert!(!o.status.success(), "a repository without index must not check clean:\n{}", text(&o));

    let o = shmback(&repo, &["repair", "index", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(files(&repo, "index").is_empty(), "--dry-run wrote an index");

    let o = shmback(&repo, &["repair", "index"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 index files before"), "{}", text(&o));
    let o = shmback(&repo, &["check", "--read-data"]);
    assert!(o.status.success(), "{}", text(&o));

    let dest = dir.path().join("dest");
    let o = shmback(&repo, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("keep/good.txt")).unwrap(), noise(1, 5000));
    assert!(std::fs::read(dest.join("big.bin")).unwrap() == noise(2, BIG));
}

#[test]
fn repair_snapshots_cuts_lost_data_out_and_check_is_clean_again() {
    let (dir, repo) = two_snapshots();
    let (pack, _) = big_pack(&repo);
    std::fs::remove_file(&pack).unwrap();
    let o = shmback(&repo, &["repair", "index"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = shmback(&repo, &["check"]);
    assert!(!o.status.success(), "the snapshot still references lost data:\n{}", text(&o));

    let o = shmback(&repo, &["repair", "snapshots", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 snapshots checked, 0 repaired snapshots saved, 0 removed"), "{}", text(&o));
    assert!(text(&shmback(&repo, &["snapshots"])).contains("2 snapshots"));

    let o = shmback(&repo, &["repair", "snapshots", "--forget"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 snapshots checked, 1 repaired snapshots saved, 1 removed"), "{}", text(&o));
    assert!(text(&o).contains("repaired"), "{}", text(&o));
    let o = shmback(&repo, &["check", "--read-data"]);
    assert!(o.status.success(), "{}", text(&o));

    let dest = dir.path().join("dest");
    let o = shmback(&repo, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("keep/good.txt")).unwrap(), noise(1, 5000));
    assert!(!dest.join("big.bin").exists());
    assert_eq!(
        std::fs::metadata(dest.join("big.bin.repaired")).unwrap().len(),
        0,
        "the lost file keeps its name + suffix"
    );
}

#[test]
fn repair_has_help_with_examples() {
    for sub in [&["repair", "--help"][..], &["repair", "index", "--help"], &["repair", "snapshots", "--help"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_shmback")).args(sub).output().unwrap();
        assert!(o.status.success());
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("Examples") && help.contains("shmback repair "), "{sub:?}:\n{help}");
    }
}

//! A tree sent by the writer through a real segment is stored as one snapshot whose files restore
//! byte-exact; a second batch of the same tree names the first as parent; a batch whose producer
//! aborts makes no snapshot.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{PW, Server, cfg, fresh_repo, shm_dir};
use rustic_core::{Credentials, Repository, RepositoryOptions};
use shmback_uploader::ServeOptions;
use shmback_writer::{Outbox, OutboxOptions};

fn content(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 131 + seed * 7) % 253) as u8).collect()
}

fn tree(root: &Path) {
    for i in 0..50 {
        let d = root.join(format!("d{}", i % 5));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), content(i, i * 997 % 5000)).unwrap();
    }
    // Several times the 4 MiB ring.
    std::fs::write(root.join("big.bin"), content(99, 13 << 20)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
    // An empty directory, a deep tree, a file with unusual mode bits and an old nanosecond mtime.
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    let deep: std::path::PathBuf = (0..40).map(|i| format!("level{i}")).collect();
    std::fs::create_dir_all(root.join(&deep)).unwrap();
    std::fs::write(root.join(&deep).join("leaf"), b"deep").unwrap();
    let odd = root.join("d1/odd-mode");
    std::fs::write(&odd, b"x").unwrap();
    std::fs::set_permissions(&odd, std::os::unix::fs::PermissionsExt::from_mode(0o4751)).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    std::fs::File::options().write(true).open(&odd).unwrap().set_modified(t).unwrap();
}

#[test]
fn batches_become_snapshots_that_restore_byte_exact() {
    let (_repo_dir, repo_loc) = fresh_repo();
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start_with(&repo_loc, &seg, ServeOptions::default(), |o| Some(format!("{o:?}")));

    let mut ob = Outbox::open(&seg, OutboxOptions::default()).unwrap();
    let mut ids = vec![];
    for _ in 0..2 {
        let mut b = ob.batch();
        b.add_dir("data", src.path()).unwrap();
        // A stream of unknown size (like `shmback-send --stdin`), several ring sizes long.
        b.add_reader("dump/stream.sql", None, Default::default(), std::io::Cursor::new(content(7, 9 << 20))).unwrap();
        b.tag("test");
        ids.push(b.commit().unwrap().wait_durable(Duration::from_secs(120)).unwrap());
    }
    // An aborted batch: a reader that lies about its size.
    let mut b = ob.batch();
    b.add_reader("bad", Some(10), Default::default(), std::io::Cursor::new(vec![1u8; 3])).unwrap();
    assert!(b.commit().is_err());
    let mut b = ob.batch();
    b.add_bytes("after", "ok").unwrap();
    ids.push(b.commit().unwrap().wait_durable(Duration::from_secs(120)).unwrap());
    drop(ob);
    let outcomes = server.stop();
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("Stored")).count(), 3, "{outcomes:#?}");
    assert_eq!(outcomes.iter().filter(|o| o.starts_with("Rejected")).count(), 1, "{outcomes:#?}");

    // Restore through rustic_core and compare.
    let backends = rustic_backend::BackendOptions::default().repository(&repo_loc).to_backends().unwrap();
    let repo = Repository::new(&RepositoryOptions::default(), &backends)
        .unwrap()
        .open(&Credentials::password(PW))
        .unwrap()
        .to_indexed()
        .unwrap();
    let snaps = repo.get_all_snapshots().unwrap();
    assert_eq!(snaps.len(), 3);
    let mut snaps = snaps;
    snaps.sort_by_key(|s| s.time.clone());
    assert_eq!(snaps[1].parent, Some(snaps[0].id), "the second batch names the first as parent");
    for (s, id) in snaps.iter().zip(&ids) {
        assert_eq!(shmback_uploader::serve::snapshot_id_bytes(s), id.0, "the ack carries the stored snapshot's id");
    }
    let check = |rel: &str, want: &[u8]| {
        let node =
            repo.node_from_snapshot_path(&format!("{}:/{rel}", snaps[1].id.to_hex().as_str()), |_| true).unwrap();
        let mut out = vec![];
        repo.dump(&node, &mut out).unwrap();
        assert!(out == want, "{rel} differs after restore");
        assert_eq!(node.meta.size, want.len() as u64);
    };
    check("data/big.bin", &content(99, 13 << 20));
    // The stream's node records the size read (restic truncates a restored file to it).
    check("dump/stream.sql", &content(7, 9 << 20));
    // The repository checks clean, data included, and a full restore equals the source tree.
    shmback_uploader::commands::check(&cfg(&repo_loc), true).unwrap();
    let dest = tempfile::tempdir().unwrap();
    shmback_uploader::commands::restore(&cfg(&repo_loc), &snaps[1].id.to_hex(), dest.path()).unwrap();
    let (files, bytes) = shmback_uploader::demo::compare_trees(src.path(), &dest.path().join("data")).unwrap();
    assert_eq!(files, 55);
    assert_eq!(bytes, (13 << 20) + 4 + 1 + (0..50).map(|i| (i * 997 % 5000) as u64).sum::<u64>());
    check("data/empty", b"");
    for i in 0..50 {
        check(&format!("data/d{}/f{i}", i % 5), &content(i, i * 997 % 5000));
    }
}

#[test]
fn a_file_changed_with_the_same_size_and_another_mtime_is_stored_again() {
    let (_repo_dir, loc) = fresh_repo();
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start_with(&loc, &seg, ServeOptions::default(), |o| match o {
        shmback_uploader::BatchOutcome::Stored { snapshot, .. } => {
            Some((snapshot.id, snapshot.parent, snapshot.summary.clone().unwrap()))
        }
        shmback_uploader::BatchOutcome::Rejected { .. } => None,
    });
    let mut ob = Outbox::open(&seg, OutboxOptions::default()).unwrap();
    let mut send = || {
        let mut b = ob.batch();
        b.add_dir("data", src.path()).unwrap();
        b.commit().unwrap().wait_durable(Duration::from_secs(120)).unwrap();
    };
    send();
    send();
    // Same size, other bytes, an mtime one second later.
    let f = src.path().join("d3/f3");
    let old = std::fs::read(&f).unwrap();
    let new: Vec<u8> = old.iter().map(|b| b.wrapping_add(1)).collect();
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap() + Duration::from_secs(1);
    std::fs::write(&f, &new).unwrap();
    std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
    send();
    drop(ob);
    let s = server.stop();
    assert_eq!(s.len(), 3);
    assert_eq!(s[1].1, Some(s[0].0));
    assert_eq!(s[2].1, Some(s[1].0), "the changed batch's parent is the previous snapshot");
    assert_eq!(s[1].2.data_added_files, 0, "an unchanged tree stores no new file data");
    assert_eq!((s[2].2.files_changed, s[2].2.files_unmodified), (1, s[1].2.files_unmodified - 1));
    assert!(s[2].2.data_added_files > 0, "the change was stored");
    let dest = tempfile::tempdir().unwrap();
    shmback_uploader::commands::restore(&cfg(&loc), "latest:/data/d3/f3", &dest.path().join("f3")).unwrap();
    assert!(std::fs::read(dest.path().join("f3")).unwrap() == new);
}

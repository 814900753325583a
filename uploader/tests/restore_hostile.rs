//! Restore never writes outside its destination: symlinks already in the destination, and
//! symlinks a producer stored in an earlier snapshot, are never followed when restoring
//! directories, files or their metadata; a link standing where the snapshot has a file or a
//! directory is replaced (the link, not its target).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use common::{fresh_repo, send_batches as send, shmback_pw as shmback, text};

/// Names and contents of everything below `dir` (empty if nothing).
fn listing(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    out
}

#[test]
fn links_already_in_the_destination_are_replaced_not_followed() {
    let (work, repo) = fresh_repo();
    let ids = send(
        &repo,
        vec![Box::new(|b| {
            b.add_bytes("dir/a.txt", "restored a").unwrap();
            b.add_bytes("dir/sub/b.txt", "restored b").unwrap();
            b.add_bytes("file", "restored file").unwrap();
            b.add_bytes("plain.txt", "plain").unwrap();
        })],
    );

    // Outside the destination: a directory and a file a hostile destination points at.
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let victim = work.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let victim_mtime = std::fs::metadata(&victim).unwrap().mtime();

    let dest = work.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    symlink(&elsewhere, dest.join("dir")).unwrap();
    symlink(&victim, dest.join("file")).unwrap();

    let o = shmback(&repo, &["restore", &ids[0], dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    assert!(listing(&elsewhere).is_empty(), "restore wrote into the linked directory: {:?}", listing(&elsewhere));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "restore wrote through the file link");
    let vm = std::fs::metadata(&victim).unwrap();
    assert_eq!(vm.permissions().mode() & 0o7777, 0o600, "restore changed the link target's mode");
    assert_eq!(vm.mtime(), victim_mtime, "restore changed the link target's mtime");

    // The links were replaced by what the snapshot holds.
    assert!(std::fs::symlink_metadata(dest.join("dir")).unwrap().is_dir());
    assert!(std::fs::symlink_metadata(dest.join("file")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(dest.join("dir/a.txt")).unwrap(), "restored a");
    assert_eq!(std::fs::read_to_string(dest.join("dir/sub/b.txt")).unwrap(), "restored b");
    assert_eq!(std::fs::read_to_string(dest.join("file")).unwrap(), "restored file");
    assert_eq!(std::fs::read_to_string(dest.join("plain.txt")).unwrap(), "plain");
}

#[test]
fn a_link_from_one_batch_does_not_redirect_the_next_batchs_directory() {
    let (work, repo) = fresh_repo();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let outside_file = work.path().join("outside-file");
    std::fs::write(&outside_file, "untouched").unwrap();

    // What a hostile producer sends: batch 1 a link `l` to a directory outside any restore
    // target and a link `f` to a file outside; batch 2 a directory `l/x` and a file `f`.
    let src = tempfile::tempdir().unwrap();
    symlink(&outside, src.path().join("l")).unwrap();
    symlink(&outside_file, src.path().join("f")).unwrap();
    std::fs::create_dir_all(src.path().join("tree/x")).unwrap();
    std::fs::write(src.path().join("tree/x/payload"), "payload").unwrap();
    let (l, f, tree) = (src.path().join("l"), src.path().join("f"), src.path().join("tree"));
    let ids = send(
        &repo,
        vec![
            Box::new(move |b| {
                b.add_path("l", &l).unwrap();
                b.add_path("f", &f).unwrap();
            }),
            Box::new(move |b| {
                b.add_dir("l", &tree).unwrap();
                b.add_bytes("f", "overwritten?").unwrap();
            }),
        ],
    );

    let dest = work.path().join("target");
    let o = shmback(&repo, &["restore", &ids[0], dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    // Batch 1 restores as links (that is its content)...
    assert_eq!(std::fs::read_link(dest.join("l")).unwrap(), outside);
    assert_eq!(std::fs::read_link(dest.join("f")).unwrap(), outside_file);
    // ...and batch 2 into the same target must not go through them.
    let o = shmback(&repo, &["restore", &ids[1], dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(listing(&outside).is_empty(), "restore wrote outside its target: {:?}", listing(&outside));
    assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), "untouched");
    assert!(std::fs::symlink_metadata(dest.join("l")).unwrap().is_dir());
    assert_eq!(std::fs::read_to_string(dest.join("l/x/payload")).unwrap(), "payload");
    assert!(std::fs::symlink_metadata(dest.join("f")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "overwritten?");

    // Restoring batch 1 again over that: the links come back in place of the directory and the
    // file; still nothing outside changes.
    let o = shmback(&repo, &["restore", &ids[0], dest.to_str().unwrap()]);
    assert!(listing(&outside).is_empty(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), "untouched");
}

#[test]
fn metadata_of_a_restored_link_is_set_on_the_link_only() {
    let (work, repo) = fresh_repo();
    let victim = work.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::File::options().write(true).open(&victim).unwrap().set_modified(old).unwrap();
    let src = tempfile::tempdir().unwrap();
    symlink(&victim, src.path().join("link")).unwrap();
    let link = src.path().join("link");
    let ids = send(&repo, vec![Box::new(move |b| b.add_path("link", &link).unwrap())]);

    let dest = work.path().join("dest");
    let o = shmback(&repo, &["restore", &ids[0], dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_link(dest.join("link")).unwrap(), victim);
    let vm = std::fs::metadata(&victim).unwrap();
    assert_eq!(vm.permissions().mode() & 0o7777, 0o640);
    assert_eq!(vm.modified().unwrap(), old);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

#[test]
fn a_restore_that_may_not_give_files_away_says_so_once_not_once_per_file() {
    // A restore init container runs as the app's user, without CAP_CHOWN: the snapshot's files
    // belong to another user (4242 here). As root (CI) the restore runs as `nobody` through
    // setpriv, which drops every capability; as any other user it runs as that user.
    let (work, repo) = fresh_repo();
    send(
        &repo,
        vec![Box::new(|b| {
            let meta = shmback_writer::EntryMeta { uid: 4242, gid: 4242, ..shmback_writer::EntryMeta::default() };
            for i in 0..25 {
                b.add_reader(format!("owned/f{i}"), None, meta, std::io::Cursor::new(format!("file {i}"))).unwrap();
            }
        })],
    );
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let dest = work.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    // `nobody` reads the repository and writes the destination.
    let open_up = std::process::Command::new("chmod").arg("-R").arg("a+rwX").arg(work.path()).status().unwrap();
    assert!(open_up.success());
    let mut restore = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_shmback")]);
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_shmback"))
    };
    let out = restore
        .args(["restore", "latest", dest.to_str().unwrap()])
        .env("RESTIC_REPOSITORY", &repo)
        .env("RESTIC_PASSWORD", common::PW)
        .env_remove("RESTIC_PASSWORD_FILE")
        .env_remove("RESTIC_PASSWORD_COMMAND")
        .output()
        .expect("running the restore (setpriv from util-linux, as root)");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(listing(&dest.join("owned")).len(), 25, "{log}");
    assert_eq!(std::fs::read_to_string(dest.join("owned/f7")).unwrap(), "file 7");
    assert!(!log.contains("failed"), "no warning per file:\n{log}");
    assert_eq!(log.matches("restoring without CAP_CHOWN").count(), 1, "one line says it:\n{log}");
}

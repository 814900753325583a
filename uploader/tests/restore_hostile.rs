//! Restore never writes outside its destination: symlinks already in the destination, and
//! symlinks a producer stored in an earlier snapshot, are never followed when restoring
//! directories, files or their metadata; a link standing where the snapshot has a file or a
//! directory is replaced (the link, not its target).

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shmback_uploader::{ServeOptions, open_repo, serve};
use shmback_writer::{Batch, Outbox, OutboxOptions};

const PW: &str = "pw";

fn cfg(location: &str) -> shmback_uploader::RepositoryConfig {
    shmback_uploader::RepositoryConfig::new(location, PW).unwrap()
}
const T: Duration = Duration::from_secs(120);

/// A new repository in a temporary directory: the directory (kept alive) and its location.
fn fresh_repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("repo").to_str().unwrap().to_string();
    open_repo(&cfg(&loc), true).unwrap();
    (dir, loc)
}

/// Fills one batch.
type Fill = Box<dyn FnOnce(&mut Batch<'_>)>;

/// Sends each batch (filled by its closure) through a real segment to a serving uploader;
/// returns the snapshot ids, in order.
fn send(repo: &str, batches: Vec<Fill>) -> Vec<String> {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, seg2, loc) = (stop.clone(), seg.clone(), repo.to_string());
    let server = std::thread::spawn(move || {
        let mut r = open_repo(&cfg(&loc), false).unwrap();
        serve(&mut r, &seg2, &ServeOptions::default(), &stop2, |_| {}).unwrap();
    });
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    let mut ids = vec![];
    for fill in batches {
        let mut b = ob.batch();
        fill(&mut b);
        let id = b.commit().unwrap().wait_durable(T).unwrap();
        ids.push(id.0.iter().map(|x| format!("{x:02x}")).collect());
    }
    drop(ob);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    ids
}

fn shmback(repo: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PW)
        .env_remove("RESTIC_PASSWORD_FILE")
        .env_remove("RESTIC_PASSWORD_COMMAND")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

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

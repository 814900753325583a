//! The vendored engine's speed patches change nothing it writes (docs/decisions/0003): files of
//! many sizes are backed up with the patched rustic_core in one snapshot (one archiver, so the
//! shared Rabin tables and the reused zstd contexts serve many files in turn), and every stored
//! data blob is compared with what upstream's code computes for the same file:
//! - chunk boundaries and blob ids: a Rabin hash with tables built afresh for the file (upstream
//!   builds them per file) and upstream's chunking loop, then SHA-256;
//! - pack bytes: the blob is read from its pack file, decrypted with the repository's master key
//!   and compared byte for byte with `zstd::stream::encode_all` at the repository's level (a new
//!   zstd context, as upstream compresses every blob).
//!
//! Then what the per-thread decompression context (patch 0010) reads: every file back through the
//! engine, and repository files whose payload is not one plain zstd frame, accepted or refused
//! exactly as `zstd::stream::decode_all` accepts or refuses them.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use aes256ctr_poly1305aes::aead::Aead;
use aes256ctr_poly1305aes::{Aes256CtrPoly1305Aes, Key, Nonce};
use rustic_cdc::{Polynom64, Rabin64, RollingHash64};
use rustic_core::repofile::MasterKey;
use rustic_core::{
    BackupOptions, ConfigOptions, Credentials, DataId, KeyOptions, LsOptions, PathList, Repository, RepositoryOptions,
    SnapshotOptions,
};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// restic's chunker parameters (rustic_core's defaults for a new repository).
const MIN_SIZE: usize = 512 * KIB;
const MAX_SIZE: usize = 8 * MIB;
const SPLIT_MASK: u64 = (MIB as u64) - 1;

/// Deterministic bytes (xorshift64*): incompressible, so chunk boundaries are content-defined.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like, compressible bytes: what most small files of a workload look like.
fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "backup",
        "ring ",
        "segment ",
        "the ",
        "of ",
        "shmback\n",
        "data ",
        "pack ",
        "index ",
        "a ",
        "blob ",
        "tree\n",
    ];
    let r = random_bytes(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[usize::from(r[i % r.len().max(1)]) % WORDS.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Upstream's chunker (rustic_core 0.13 `chunker/rabin.rs`), with its tables built for this one
/// file as upstream's `ChunkIter::from_config` does.
fn stock_chunks(data: &[u8], poly: Polynom64) -> Vec<&[u8]> {
    let mut rabin = Rabin64::new_with_polynom(6, &poly);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let rest = &data[start..];
        if rest.len() < MIN_SIZE {
            chunks.push(rest);
            break;
        }
        let mut end = MIN_SIZE;
        _ = rabin.reset_and_prefill_window(&mut rest[MIN_SIZE - 64..MIN_SIZE].iter().copied());
        while end < rest.len() && end < MAX_SIZE && rabin.hash & SPLIT_MASK != 0 {
            rabin.slide(rest[end]);
            end += 1;
        }
        chunks.push(&rest[..end]);
        start += end;
    }
    chunks
}

fn files() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    // Around every size the chunker and zstd treat specially: empty, one byte, the Rabin window,
    // zstd's 128 KiB block, the minimum chunk (a file below it is one blob), the maximum chunk.
    let edges = [
        0,
        1,
        63,
        64,
        65,
        4095,
        4096,
        4097,
        128 * KIB - 1,
        128 * KIB,
        128 * KIB + 1,
        MIN_SIZE - 1,
        MIN_SIZE,
        MIN_SIZE + 1,
        MIN_SIZE + 64,
        MAX_SIZE - 1,
        MAX_SIZE,
        MAX_SIZE + 1,
    ];
    for (i, &n) in edges.iter().enumerate() {
        files.push((format!("edge-random-{n}"), random_bytes(i as u64 + 1, n)));
        files.push((format!("edge-text-{n}"), text_bytes(i as u64 + 100, n)));
    }
    // Many small files in a row: the shared state serves one file after another.
    for i in 0..300_u64 {
        let n = usize::try_from(1 + (i * i * 7919) % (64 * KIB as u64)).unwrap();
        files.push((format!("small-{i}"), text_bytes(1000 + i, n)));
    }
    // Content-defined boundaries after the tables served other files, and forced ones (zeros hit
    // a boundary at the minimum size; a repeating pattern reaches the maximum).
    files.push(("large-random".into(), random_bytes(7, 19 * MIB + 12_345)));
    files.push(("large-zeros".into(), vec![0; 3 * MIB + 5]));
    files.push(("large-pattern".into(), b"0123456789abcdef".repeat(MIB + 77)));
    files
}

fn pack_path(repo: &Path, pack: &str) -> PathBuf {
    repo.join("data").join(&pack[..2]).join(pack)
}

#[test]
fn patched_engine_stores_what_upstream_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("files");
    fs::create_dir(&src).unwrap();
    let files = files();
    for (name, data) in &files {
        fs::write(src.join(name), data).unwrap();
    }

    let repo_dir = tmp.path().join("repo");
    let master = MasterKey::new();
    let key: Vec<u8> = [&master.encrypt[..], &master.mac.k[..], &master.mac.r[..]].concat();
    let backends =
        rustic_backend::BackendOptions::default().repository(repo_dir.to_str().unwrap()).to_backends().unwrap();
    let repo = Repository::new(&RepositoryOptions::default(), &backends)
        .unwrap()
        .init(&Credentials::Masterkey(master), &KeyOptions::default(), &ConfigOptions::default())
        .unwrap()
        .to_indexed_ids()
        .unwrap();
    let poly = repo.config().poly().unwrap();
    let level = repo.config().zstd().unwrap().expect("a new repository compresses (version 2)");
    let paths = PathList::from_string(src.to_str().unwrap()).unwrap().sanitize().unwrap();
    let snap =
        repo.backup(&BackupOptions::default(), &paths, SnapshotOptions::default().to_snapshot().unwrap()).unwrap();

    let repo = repo.to_indexed().unwrap();
    let root = repo.node_from_snapshot_path(&format!("{}:", snap.id.to_hex().as_str()), |_| true).unwrap();
    let stored: HashMap<String, Vec<DataId>> = repo
        .ls(&root, &LsOptions::default())
        .unwrap()
        .map(Result::unwrap)
        .filter(|(_, node)| node.is_file())
        .map(|(path, node)| (path.file_name().unwrap().to_string_lossy().into_owned(), node.content.clone().unwrap()))
        .collect();
    assert_eq!(stored.len(), files.len(), "every file is in the snapshot");

    let cipher = Aes256CtrPoly1305Aes::new(Key::from_slice(&key));
    let (mut blobs, mut multi_chunk) = (0, 0);
    for (name, data) in &files {
        let chunks = stock_chunks(data, poly);
        let ids: Vec<String> =
            chunks.iter().map(|c| Sha256::digest(c).iter().map(|b| format!("{b:02x}")).collect()).collect();
        let got: Vec<String> = stored[name].iter().map(|id| id.to_hex().to_string()).collect();
        assert_eq!(got, ids, "{name}: chunk boundaries or blob ids differ from upstream's");
        multi_chunk += usize::from(chunks.len() > 1);

        for (chunk, id) in chunks.iter().zip(&stored[name]) {
            let entry = repo.get_index_entry(id).unwrap();
            let mut pack = fs::File::open(pack_path(&repo_dir, entry.pack.to_hex().as_str())).unwrap();
            let mut raw = vec![0; entry.location.offset as usize + entry.location.length as usize];
            pack.read_exact(&mut raw).unwrap();
            let raw = &raw[entry.location.offset as usize..];
            let plain = cipher
                .decrypt(Nonce::from_slice(&raw[..16]), &raw[16..])
                .unwrap_or_else(|_| panic!("{name}: blob {id} does not decrypt with the master key"));
            let stock = zstd::stream::encode_all(*chunk, level).unwrap();
            assert_eq!(
                entry.location.uncompressed_length.map(|n| n.get() as usize),
                Some(chunk.len()),
                "{name}: blob {id}'s uncompressed length"
            );
            assert!(
                plain == stock,
                "{name}: blob {id} ({} bytes) is not compressed as upstream compresses it",
                chunk.len()
            );
            blobs += 1;
        }
    }
    assert!(multi_chunk >= 5, "the corpus has files of several chunks ({multi_chunk})");
    assert!(blobs > files.len(), "{blobs} blobs checked");

    // Read back through the engine (its per-thread zstd decompression context serves one blob
    // after another, of every size above): each file's content is what was backed up.
    let by_name: HashMap<&str, &Vec<u8>> = files.iter().map(|(n, d)| (n.as_str(), d)).collect();
    for item in repo.ls(&root, &LsOptions::default()).unwrap() {
        let (path, node) = item.unwrap();
        if !node.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut back = Vec::new();
        repo.dump(&node, &mut back).unwrap();
        assert!(back == *by_name[name.as_str()], "{name}: read back differs from what was backed up");
    }

    // Repository files whose zstd payload is not one plain frame: the engine decodes what
    // `zstd::stream::decode_all` decodes and refuses what it refuses (then still decodes the next
    // file: a failed context is not reused).
    let snap_hex = snap.id.to_hex().to_string();
    let sealed = fs::read(repo_dir.join("snapshots").join(&snap_hex)).unwrap();
    let plain = cipher.decrypt(Nonce::from_slice(&sealed[..16]), &sealed[16..]).unwrap();
    assert_eq!(plain[0], 2, "snapshot files of a version 2 repository are compressed");
    let json = zstd::stream::decode_all(&plain[1..]).unwrap();
    let seal = |payload: &[u8]| -> String {
        let nonce = [7u8; 16];
        let mut file = nonce.to_vec();
        file.extend(cipher.encrypt(Nonce::from_slice(&nonce), [&[2u8][..], payload].concat().as_slice()).unwrap());
        let id: String = Sha256::digest(&file).iter().map(|b| format!("{b:02x}")).collect();
        fs::write(repo_dir.join("snapshots").join(&id), &file).unwrap();
        id
    };
    let frame = zstd::stream::encode_all(&json[..], level).unwrap();
    let half = json.len() / 2;
    let two_frames =
        [zstd::stream::encode_all(&json[..half], level).unwrap(), zstd::stream::encode_all(&json[half..], 1).unwrap()]
            .concat();
    let cases: [(&str, Vec<u8>, bool); 4] = [
        ("two frames", two_frames, true),
        ("a truncated frame", frame[..frame.len() - 3].to_vec(), false),
        ("a frame and trailing bytes", [&frame[..], b"not zstd"].concat(), false),
        ("not zstd at all", b"\x28\xb5\x2f\xfd but no frame".to_vec(), false),
    ];
    for (what, payload, decodes) in cases {
        assert_eq!(zstd::stream::decode_all(&payload[..]).is_ok(), decodes, "{what}: upstream's verdict");
        let id = seal(&payload);
        match repo.get_snapshots(&[id.as_str()]) {
            Ok(got) => {
                assert!(decodes, "{what}: the engine decoded what upstream refuses");
                assert_eq!(got[0].tree, snap.tree, "{what}: decoded to another snapshot");
            }
            Err(e) => assert!(!decodes, "{what}: the engine refused what upstream decodes: {e}"),
        }
        fs::remove_file(repo_dir.join("snapshots").join(&id)).unwrap();
        let again = repo.get_snapshots(&[snap_hex.as_str()]).unwrap();
        assert_eq!(again[0].tree, snap.tree, "after {what}: the stored snapshot still reads");
    }
}

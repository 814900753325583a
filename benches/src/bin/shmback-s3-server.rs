//! A local S3 server for the end-to-end benchmark (`benches/e2e.py --s3`): the in-process server
//! of the uploader's S3 tests (`shmback_tests::s3_server`, no faults switched on) serving a
//! directory (each subdirectory a bucket) on 127.0.0.1, so both shmback and restic upload to the
//! same server over real HTTP.
//!
//! Usage: `shmback-s3-server <root dir> <port>`; credentials from `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`. Prints `listening on 127.0.0.1:<port>` once it accepts connections,
//! and serves until killed.

use std::io::Write as _;

use shmback_tests::s3_server::S3Server;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: shmback-s3-server <root dir> <port>";
    let root = args.next().ok_or(usage)?;
    let port: u16 = args.next().ok_or(usage)?.parse()?;
    let key = std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| "set AWS_ACCESS_KEY_ID")?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| "set AWS_SECRET_ACCESS_KEY")?;
    std::fs::create_dir_all(&root)?;
    let server = S3Server::start(std::path::Path::new(&root), port, &key, &secret)?;
    println!("listening on {}", server.addr());
    std::io::stdout().flush()?;
    // The server runs on its own threads until the process is killed.
    loop {
        std::thread::park();
    }
}

//! A local S3 server for the end-to-end benchmark (`benches/e2e.py --s3`): `s3s` + `s3s-fs`
//! serving a directory (each subdirectory a bucket) on 127.0.0.1, so both shmback and restic
//! upload to the same server over real HTTP.
//!
//! Usage: `shmback-s3-server <root dir> <port>`; credentials from `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`. Prints `listening on 127.0.0.1:<port>` once it accepts connections,
//! and serves until killed.

use std::io::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: shmback-s3-server <root dir> <port>";
    let root = args.next().ok_or(usage)?;
    let port: u16 = args.next().ok_or(usage)?.parse()?;
    let key = std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| "set AWS_ACCESS_KEY_ID")?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| "set AWS_SECRET_ACCESS_KEY")?;
    std::fs::create_dir_all(&root)?;
    let service = {
        let mut b = s3s::service::S3ServiceBuilder::new(
            s3s_fs::FileSystem::new(&root).map_err(|e| format!("serving {root}: {e:?}"))?,
        );
        b.set_auth(s3s::auth::SimpleAuth::from_single(key, secret));
        b.build()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        loop {
            let (socket, _) = listener.accept().await?;
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}

//! `BlobBody` against a small HTTP server on loopback that misbehaves on purpose: it ignores
//! `Range`, cuts bodies short, or serves too much. Every case checks the exact bytes.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use modelpack_registry::{Client, ClientOptions, Error, Repository};
use modelpack_spec::Digest;

/// How the server answers one blob GET.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Honour `Range` (206) or send the whole blob (200).
    Honest,
    /// Always the whole blob with 200, whatever `Range` says.
    IgnoreRange,
    /// Honour `Range`, but close the connection after this many body bytes.
    CutAfter(usize),
}

struct Server {
    port: u16,
    requests: Arc<AtomicUsize>,
}

/// Serves `blob` for any GET; the n-th request is answered as `script[n]` (the last entry
/// repeats).
fn serve(blob: Arc<Vec<u8>>, script: Vec<Answer>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let script = Arc::new(Mutex::new(script));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut stream) = conn else { continue };
            let (blob, script, counter) = (blob.clone(), script.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                loop {
                    let mut range = None;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some(v) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.split_once('-').unwrap_or((v, ""));
                            let start: usize = a.parse().unwrap_or(0);
                            let end: usize = b.parse::<usize>().map_or(blob.len(), |e| e + 1);
                            range = Some((start, end.min(blob.len())));
                        }
                    }
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let answer = {
                        let s = script.lock().expect("lock");
                        s[n.min(s.len() - 1)]
                    };
                    let (status, start, end) = match (answer, range) {
                        (Answer::IgnoreRange, _) | (_, None) => ("200 OK", 0, blob.len()),
                        (_, Some((a, b))) => ("206 Partial Content", a, b),
                    };
                    let mut head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n",
                        end - start
                    );
                    if status.starts_with("206") {
                        head.push_str(&format!(
                            "Content-Range: bytes {start}-{}/{}\r\n",
                            end - 1,
                            blob.len()
                        ));
                    }
                    head.push_str("\r\n");
                    if stream.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let body = &blob[start..end];
                    if let Answer::CutAfter(k) = answer {
                        let _ = stream.write_all(&body[..k.min(body.len())]);
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if stream.write_all(body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Server { port, requests }
}

fn blob(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i * 7 + i / 251) as u8).collect())
}

fn repo(port: u16) -> Repository {
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let reference = format!("127.0.0.1:{port}/test/blob:v1")
        .parse()
        .expect("reference");
    Repository::new(&client, &reference)
}

async fn read_all(
    repo: &Repository,
    digest: &Digest,
    range: Option<std::ops::Range<u64>>,
) -> Result<Vec<u8>, Error> {
    let mut body = repo.blob_stream(digest, range).await?;
    let mut out = Vec::new();
    while let Some(piece) = body.next_chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[tokio::test]
async fn a_range_is_served_exactly_when_the_server_ignores_range() {
    let data = blob(300_000);
    let server = serve(data.clone(), vec![Answer::IgnoreRange]);
    let digest = Digest::sha256_of(&data);
    let got = read_all(&repo(server.port), &digest, Some(100_000..200_123))
        .await
        .expect("read");
    assert_eq!(got, data[100_000..200_123]);
}

#[tokio::test]
async fn a_cut_body_resumes_from_the_last_byte() {
    let data = blob(1 << 20);
    let server = serve(
        data.clone(),
        vec![
            Answer::CutAfter(70_000),
            Answer::CutAfter(300_000),
            Answer::Honest,
        ],
    );
    let digest = Digest::sha256_of(&data);
    let repo = repo(server.port);
    let mut body = repo
        .blob_stream(&digest, Some(0..data.len() as u64))
        .await
        .expect("open");
    let mut got = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        assert_eq!(body.position(), (got.len() + piece.len()) as u64);
        got.extend_from_slice(&piece);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "resumed bytes differ");
    assert_eq!(body.resumes(), 2);
    assert_eq!(server.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_open_ended_stream_learns_its_end_and_resumes_through_an_ignored_range() {
    let data = blob(500_000);
    let server = serve(
        data.clone(),
        vec![Answer::CutAfter(123_457), Answer::IgnoreRange],
    );
    let digest = Digest::sha256_of(&data);
    let got = read_all(&repo(server.port), &digest, None)
        .await
        .expect("read");
    assert!(got == *data);
}

#[tokio::test]
async fn a_body_that_always_breaks_fails_naming_the_digest() {
    let data = blob(200_000);
    let server = serve(data.clone(), vec![Answer::CutAfter(1000)]);
    let digest = Digest::sha256_of(&data);
    let err = read_all(&repo(server.port), &digest, None)
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains(digest.as_str()), "{err}");
}

#[tokio::test]
async fn the_end_can_move_earlier_while_reading() {
    let data = blob(400_000);
    let server = serve(data.clone(), vec![Answer::Honest]);
    let digest = Digest::sha256_of(&data);
    let repo = repo(server.port);
    let mut body = repo
        .blob_stream(&digest, Some(1000..400_000))
        .await
        .expect("open");
    body.set_end(150_001);
    let mut got = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, data[1000..150_001]);
}

#[tokio::test]
async fn small_documents_are_capped_and_checked() {
    let data = blob(10_000);
    let server = serve(data.clone(), vec![Answer::Honest]);
    let repo = repo(server.port);
    let digest = Digest::sha256_of(&data);
    let got = repo.read_blob_capped(&digest, 10_000).await.expect("read");
    assert_eq!(&got[..], &data[..]);
    let err = repo
        .read_blob_capped(&digest, 9_999)
        .await
        .expect_err("over the cap");
    assert!(err.to_string().contains("over 9999 bytes"), "{err}");
    let wrong = Digest::sha256_of(b"something else");
    let err = repo
        .read_blob_capped(&wrong, 10_000)
        .await
        .expect_err("wrong digest");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

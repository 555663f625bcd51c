//! Integration tests live in `tests/`; fixtures in `fixtures/`. This library holds what test
//! files of several crates share: a local stand-in for the Hugging Face Hub.

pub mod hub_server {
    //! A local HTTP server that speaks the subset of the Hub's protocol `hf-hub` uses
    //! (`/{repo}/resolve/{revision}/{file}`, ranged GETs, `ETag` and `X-Repo-Commit` headers),
    //! serving one folder as the repository [`REPO`]. No real hub is reachable in tests, and
    //! none is needed.

    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    pub const REPO: &str = "tiny-org/tiny-llama";
    pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn respond(mut s: TcpStream, root: &std::path::Path, hits: &AtomicUsize) {
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let v = v.trim().to_string();
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("/{REPO}/resolve/main/");
        let file = path.strip_prefix(&prefix).map(|f| root.join(f));
        let body = match file.as_ref().map(std::fs::read) {
            Some(Ok(b)) => b,
            _ => {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
        };
        let size = body.len();
        let etag = format!(
            "{:016x}",
            body.iter().fold(1469598103934665603u64, |h, &b| (h ^ b as u64).wrapping_mul(1099511628211))
        );
        let (status, start, end) = match range {
            Some((a, b)) => ("206 Partial Content", a, b.map(|b| b + 1).unwrap_or(size).min(size)),
            None => ("200 OK", 0, size),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{size}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
            end - start,
            end.saturating_sub(1)
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body[start..end]);
    }

    /// Serves `root` as [`REPO`] on a free local port: the endpoint URL and a count of requests.
    pub fn serve(root: PathBuf) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                respond(s, &root, &h);
            }
        });
        (format!("http://{addr}"), hits)
    }
}

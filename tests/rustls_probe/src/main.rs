//! A rustls peer (the TLS stack of the Rust FerroTunnel) for ferrotunnel's interop tests.
//!
//!   rustls-probe client ADDR SERVER_NAME CA_PEM SEND_HEX [CERT_PEM KEY_PEM]
//!       TLS 1.3 client: verifies the server against CA_PEM, writes SEND_HEX, then prints the
//!       first frame it gets back as `frame HEX` and the protocol as `protocol TLSv1_3`.
//!   rustls-probe server CERT_PEM KEY_PEM ACK_HEX [CLIENT_CA_PEM]
//!       TLS 1.3 server on 127.0.0.1 (prints `port N`): reads one frame, prints `frame HEX`,
//!       answers with ACK_HEX, then waits for the peer to close. With CLIENT_CA_PEM it requires
//!       a client certificate signed by that CA.
//! Every failure exits with status 1 and one line on stderr.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("rustls-probe: {what}: {err}");
    std::process::exit(1)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| fail("hex", e)))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn certs(path: &str) -> Vec<rustls::Certificate> {
    let f = File::open(path).unwrap_or_else(|e| fail(path, e));
    let list = rustls_pemfile::certs(&mut BufReader::new(f)).unwrap_or_else(|e| fail(path, e));
    list.into_iter().map(rustls::Certificate).collect()
}

fn key(path: &str) -> rustls::PrivateKey {
    let f = File::open(path).unwrap_or_else(|e| fail(path, e));
    let mut keys = rustls_pemfile::pkcs8_private_keys(&mut BufReader::new(f)).unwrap_or_else(|e| fail(path, e));
    if keys.is_empty() {
        fail(path, "no PKCS#8 private key");
    }
    rustls::PrivateKey(keys.remove(0))
}

fn roots(path: &str) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path) {
        store.add(&c).unwrap_or_else(|e| fail(path, e));
    }
    store
}

/// One length-prefixed frame (PROTOCOL.md 1.1): 4-byte big-endian length, then that many bytes.
fn read_frame(s: &mut impl Read) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap_or_else(|e| fail("read", e));
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap_or_else(|e| fail("read", e));
    let mut frame = len.to_vec();
    frame.extend(body);
    frame
}

fn client(a: &[String]) {
    let builder = rustls::ClientConfig::builder()
        .with_safe_default_cipher_suites()
        .with_safe_default_kx_groups()
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| fail("config", e))
        .with_root_certificates(roots(&a[3]));
    let config = if a.len() > 6 {
        builder.with_single_cert(certs(&a[5]), key(&a[6])).unwrap_or_else(|e| fail("client cert", e))
    } else {
        builder.with_no_client_auth()
    };
    let name = rustls::ServerName::try_from(a[2].as_str()).unwrap_or_else(|e| fail("server name", e));
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap_or_else(|e| fail("connection", e));
    let sock = TcpStream::connect(&a[1]).unwrap_or_else(|e| fail("connect", e));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(&unhex(&a[4])).unwrap_or_else(|e| fail("handshake", e));
    let frame = read_frame(&mut tls);
    println!("frame {}", hex(&frame));
    println!("protocol {:?}", tls.conn.protocol_version().unwrap_or_else(|| fail("protocol", "none")));
}

fn server(a: &[String]) {
    let builder = rustls::ServerConfig::builder()
        .with_safe_default_cipher_suites()
        .with_safe_default_kx_groups()
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| fail("config", e));
    let builder = if a.len() > 4 {
        builder.with_client_cert_verifier(rustls::server::AllowAnyAuthenticatedClient::new(roots(&a[4])))
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs(&a[1]), key(&a[2])).unwrap_or_else(|e| fail("server cert", e));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail("bind", e));
    println!("port {}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().ok();
    let (sock, _) = listener.accept().unwrap_or_else(|e| fail("accept", e));
    let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap_or_else(|e| fail("connection", e));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let frame = read_frame(&mut tls);
    println!("frame {}", hex(&frame));
    println!("protocol {:?}", tls.conn.protocol_version().unwrap_or_else(|| fail("protocol", "none")));
    std::io::stdout().flush().ok();
    tls.write_all(&unhex(&a[3])).unwrap_or_else(|e| fail("write", e));
    let mut sink = [0u8; 4096];
    while let Ok(n) = tls.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.first().map(String::as_str) {
        Some("client") if a.len() >= 5 => client(&a),
        Some("server") if a.len() >= 4 => server(&a),
        _ => fail("usage", "client ADDR NAME CA SEND_HEX [CERT KEY] | server CERT KEY ACK_HEX [CLIENT_CA]"),
    }
}

//! Protocol detection on the first bytes of a connection: what `mesh-inspect` costs per accepted
//! connection, on a real curl ClientHello (517 bytes, SNI and ALPN) and an HTTP/1 request.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_inspect::{Detection, detect, parse_client_hello};

const CURL_SNI: &[u8] = include_bytes!("../../mesh-inspect/tests/data/curl_sni.bin");
const HTTP1_REQUEST: &[u8] =
    b"GET /productpage?u=normal HTTP/1.1\r\nHost: productpage:9080\r\nUser-Agent: curl/7.88.1\r\n\r\n";

/// The ClientHello of `record` (one record) re-cut into records of `fragment_len` bytes.
fn into_records(record: &[u8], fragment_len: usize) -> Vec<u8> {
    let message = record.get(5..).unwrap_or_default();
    let mut out = Vec::new();
    for fragment in message.chunks(fragment_len) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(fragment.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(fragment);
    }
    out
}

fn clienthello(c: &mut Criterion) {
    assert!(
        matches!(detect(CURL_SNI), Detection::Tls(ref s) if s.sni.as_deref() == Some("api.example.com"))
    );
    assert!(matches!(detect(HTTP1_REQUEST), Detection::Http1(_)));

    let mut group = c.benchmark_group("clienthello");
    group.throughput(Throughput::Bytes(CURL_SNI.len() as u64));
    group.bench_function("parse_curl_sni", |b| {
        b.iter(|| parse_client_hello(black_box(CURL_SNI)))
    });
    group.bench_function("detect_curl_sni", |b| {
        b.iter(|| detect(black_box(CURL_SNI)))
    });
    // The common slow path: the first read stops mid-ClientHello, the second has it all.
    let (first_read, _) = CURL_SNI.split_at(CURL_SNI.len() / 2);
    group.bench_function("detect_curl_sni_two_reads", |b| {
        b.iter(|| {
            let first = detect(black_box(first_read));
            let second = detect(black_box(CURL_SNI));
            (first, second)
        })
    });
    // Split over three records, which takes the reassembly (copying) path.
    let fragmented = into_records(CURL_SNI, 200);
    group.bench_function("parse_curl_sni_three_records", |b| {
        b.iter(|| parse_client_hello(black_box(&fragmented)))
    });
    group.finish();

    let mut group = c.benchmark_group("detect");
    group.throughput(Throughput::Elements(1));
    group.bench_function("http1_request_line", |b| {
        b.iter(|| detect(black_box(HTTP1_REQUEST)))
    });
    group.finish();
}

criterion_group!(benches, clienthello);
criterion_main!(benches);

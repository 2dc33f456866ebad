//! The local registry over HTTP, as cargo and Quarry's clients see it, including misbehaving.

use std::path::Path;

use quarry_core::index::{CratesPage, IndexConfig, download_url, index_path, parse_index_file};
use quarry_registry::{Corpus, Fault, serve};
use sha2::{Digest as _, Sha256};

/// Writes a minimal but real `.crate` archive: `<name>-<version>/Cargo.toml` and `src/lib.rs`.
fn write_crate(dir: &Path, name: &str, version: &str, deps: &[(&str, &str)]) {
    let mut manifest = format!("[package]\nname = \"{name}\"\nversion = \"{version}\"\n");
    if !deps.is_empty() {
        manifest.push_str("[dependencies]\n");
        for (dep, req) in deps {
            manifest.push_str(&format!("{dep} = \"{req}\"\n"));
        }
    }
    let file = std::fs::File::create(dir.join(format!("{name}-{version}.crate"))).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::default(),
    ));
    for (path, body) in [("Cargo.toml", manifest.as_str()), ("src/lib.rs", "")] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("{name}-{version}/{path}"),
            body.as_bytes(),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

fn corpus() -> (tempfile::TempDir, Corpus) {
    let dir = tempfile::tempdir().unwrap();
    write_crate(dir.path(), "base", "1.0.0", &[]);
    write_crate(dir.path(), "base", "1.2.0", &[]);
    write_crate(dir.path(), "user", "0.1.0", &[("base", "1.1")]);
    write_crate(dir.path(), "orphan", "0.1.0", &[("missing", "1")]);
    write_crate(dir.path(), "needs-orphan", "0.1.0", &[("orphan", "0.1")]);
    let corpus = Corpus::load(&[dir.path().to_owned()]).unwrap();
    (dir, corpus)
}

#[test]
fn the_closed_corpus_drops_what_cannot_resolve_transitively() {
    let (_dir, corpus) = corpus();
    assert_eq!(corpus.crates.len(), 4);
    let closed = corpus.closed();
    let names: Vec<&str> = closed.crates.keys().map(String::as_str).collect();
    assert_eq!(names, ["base", "user"]);
}

/// The JSON answer to a GET of `url`.
async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: String) -> T {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn serves_index_downloads_and_pages_like_crates_io() {
    let (_dir, corpus) = corpus();
    let registry = serve(corpus, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http = reqwest::Client::new();

    let config: IndexConfig = get_json(&http, format!("{}config.json", registry.index_url())).await;

    // Index file: every version, oldest first, with the real checksum of the file served.
    let index = http
        .get(format!("{}{}", registry.index_url(), index_path("base")))
        .send()
        .await
        .unwrap();
    let etag = index.headers()["etag"].clone();
    let entries = parse_index_file(&index.bytes().await.unwrap()).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.vers.as_str()).collect::<Vec<_>>(),
        ["1.0.0", "1.2.0"]
    );
    let crate_file = http
        .get(download_url(&config.dl, "base", "1.2.0"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(hex::encode(Sha256::digest(&crate_file)), entries[1].cksum);

    // A conditional request for an unchanged file is answered 304.
    let again = http
        .get(format!("{}{}", registry.index_url(), index_path("base")))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // Paged listing, following meta.next_page.
    let mut names = Vec::new();
    let mut next = Some("?per_page=3".to_owned());
    while let Some(query) = next {
        let page: CratesPage = get_json(
            &http,
            format!("{}/api/v1/crates{query}", registry.api_url()),
        )
        .await;
        assert_eq!(page.meta.total, 4);
        names.extend(page.crates.into_iter().map(|c| c.name));
        next = page.meta.next_page;
    }
    assert_eq!(names, ["base", "needs-orphan", "orphan", "user"]);

    let stats = registry.stats();
    assert_eq!((stats.downloads, stats.index_not_modified), (1, 1));
}

#[tokio::test]
async fn misbehaves_on_request() {
    let (_dir, corpus) = corpus();
    let registry = serve(corpus, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/crates/base/1.0.0/download", registry.api_url());
    let good = http.get(&url).send().await.unwrap().bytes().await.unwrap();

    registry.set_faults(vec![Fault {
        path_contains: "/download".into(),
        status: Some(429),
        retry_after_secs: Some(7),
        times: Some(1),
        ..Fault::default()
    }]);
    let limited = http.get(&url).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    assert_eq!(
        http.get(&url).send().await.unwrap().status(),
        200,
        "a fault with `times` wears off"
    );

    registry.set_faults(vec![Fault {
        path_contains: "/download".into(),
        delay_ms: Some(300),
        times: Some(1),
        ..Fault::default()
    }]);
    let started = std::time::Instant::now();
    let slow = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(slow, good, "a delayed answer is still the right one");

    registry.set_faults(vec![Fault {
        path_contains: "/download".into(),
        truncate_to: Some(10),
        ..Fault::default()
    }]);
    let cut = http.get(&url).send().await.unwrap().bytes().await;
    assert!(cut.is_err(), "a body cut short is an error for the client");
    // A fresh client: the cut connection must not be what the next assertions observe.
    let http = reqwest::Client::new();

    registry.set_faults(vec![Fault {
        path_contains: "/download".into(),
        corrupt: true,
        ..Fault::default()
    }]);
    let corrupted = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(corrupted.len(), good.len());
    assert_ne!(corrupted, good);

    // Faults can also be set over HTTP, by tests in other processes.
    http.delete(format!("{}/-/faults", registry.api_url()))
        .send()
        .await
        .unwrap();
    let healed = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(healed, good);
}

//! The registry's data, as crates.io and cargo define it: a sparse index file's lines, the
//! index's `config.json`, the web API's pages of crates, and where a crate's index file and
//! download are. Read by the registry client (`quarry-infra`), served by the test registry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One line of a sparse index file: one published version of a crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub vers: String,
    #[serde(default)]
    pub deps: Vec<IndexDependency>,
    pub cksum: String,
    #[serde(default)]
    pub features: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features2: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub yanked: bool,
    #[serde(default)]
    pub links: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rust_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexDependency {
    /// The name the dependent uses (the rename, if renamed).
    pub name: String,
    pub req: String,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default = "default_true")]
    pub default_features: bool,
    #[serde(default)]
    pub target: Option<String>,
    /// `normal`, `dev` or `build`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub registry: Option<String>,
    /// The real crate name when `name` is a rename.
    #[serde(default)]
    pub package: Option<String>,
}

impl IndexDependency {
    /// The crate depended on: the real name behind a rename.
    pub fn crate_name(&self) -> &str {
        self.package.as_deref().unwrap_or(&self.name)
    }
}

fn default_true() -> bool {
    true
}

/// The sparse index's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexConfig {
    pub dl: String,
    #[serde(default)]
    pub api: Option<String>,
}

/// One page of `/api/v1/crates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CratesPage {
    pub crates: Vec<CrateSummary>,
    pub meta: PageMeta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrateSummary {
    pub name: String,
    #[serde(default)]
    pub max_version: Option<String>,
    #[serde(default)]
    pub downloads: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageMeta {
    pub total: u64,
    /// A query string (`?page=2&per_page=100` or `?seek=...`) for the next page, if any.
    #[serde(default)]
    pub next_page: Option<String>,
}

/// The path of a crate's file inside the index (`se/rd/serde`, `3/s/syn`, `1/a`).
/// Whether `name` can be a crate's name (what crates.io allows: ASCII letters, digits, `-` and
/// `_`, at most 64 bytes). Names come from hostile manifests (through cargo's requests, or a
/// dependency list in the index): only such a name ever becomes a path or a URL.
pub fn is_crate_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn index_path(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    match name.len() {
        1 => format!("1/{name}"),
        2 => format!("2/{name}"),
        3 => format!("3/{}/{name}", &name[..1]),
        _ => format!("{}/{}/{name}", &name[..2], &name[2..4]),
    }
}

/// Parses a sparse index file (one JSON object per line).
pub fn parse_index_file(body: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1)))
        .collect()
}

/// The name (as published: the index file's path is lowercase), version and checksum of each
/// line of a sparse index file, and nothing else of it: what a download needs, read without
/// building every line's dependencies and features (a popular crate's file holds hundreds of
/// versions, and a resolution asks for it in every job).
pub fn parse_checksums(body: &[u8]) -> Result<Vec<(String, String, String)>, String> {
    #[derive(Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        vers: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        cksum: std::borrow::Cow<'a, str>,
    }
    let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_str::<Line>(line)
                .map(|line| {
                    (
                        line.name.into_owned(),
                        line.vers.into_owned(),
                        line.cksum.into_owned(),
                    )
                })
                .map_err(|e| format!("line {}: {e}", n + 1))
        })
        .collect()
}

/// Expands the `dl` template of `config.json` as cargo does.
pub fn download_url(dl: &str, name: &str, version: &str) -> String {
    const MARKERS: [&str; 5] = [
        "{crate}",
        "{version}",
        "{prefix}",
        "{lowerprefix}",
        "{sha256-checksum}",
    ];
    if !MARKERS.iter().any(|m| dl.contains(m)) {
        return format!("{}/{name}/{version}/download", dl.trim_end_matches('/'));
    }
    let prefix = index_path(name);
    let prefix = prefix
        .rsplit_once('/')
        .map_or("", |(dir, _)| dir)
        .to_owned();
    dl.replace("{crate}", name)
        .replace("{version}", version)
        .replace("{lowerprefix}", &prefix.to_ascii_lowercase())
        .replace("{prefix}", &prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_read_from_full_lines_and_a_bad_line_is_an_error() {
        let body = concat!(
            r#"{"name":"Inflector","vers":"1.0.0","deps":[{"name":"b","req":"^1","features":[],"optional":false,"default_features":true,"target":null,"kind":"normal"}],"cksum":"11","features":{"x":["b/y"]},"yanked":false}"#,
            "\n\n",
            r#"{"name":"Inflector","vers":"1.1.0-rc.1","deps":[],"cksum":"22","features":{},"yanked":true,"rust_version":"1.70"}"#,
            "\n"
        );
        let line =
            |vers: &str, cksum: &str| ("Inflector".to_owned(), vers.to_owned(), cksum.to_owned());
        assert_eq!(
            parse_checksums(body.as_bytes()).unwrap(),
            [line("1.0.0", "11"), line("1.1.0-rc.1", "22")]
        );
        // An escaped string is read as a plain one.
        assert_eq!(
            parse_checksums(br#"{"name":"Inflector","vers":"1.0.0","cksum":"\u0031\u0031"}"#)
                .unwrap(),
            [line("1.0.0", "11")]
        );
        assert!(
            parse_checksums(b"{\"name\":\"a\",\"vers\":\"1.0.0\"}")
                .unwrap_err()
                .starts_with("line 1")
        );
    }

    #[test]
    fn index_paths_follow_cargos_layout() {
        assert_eq!(index_path("a"), "1/a");
        assert_eq!(index_path("ab"), "2/ab");
        assert_eq!(index_path("syn"), "3/s/syn");
        assert_eq!(index_path("Serde"), "se/rd/serde");
    }

    #[test]
    fn download_templates_expand_like_cargo() {
        assert_eq!(
            download_url("https://static.crates.io/crates", "serde", "1.0.0"),
            "https://static.crates.io/crates/serde/1.0.0/download"
        );
        assert_eq!(
            download_url(
                "http://r/{prefix}/{crate}-{version}.crate",
                "serde",
                "1.0.0"
            ),
            "http://r/se/rd/serde-1.0.0.crate"
        );
    }

    #[test]
    fn index_files_parse_and_errors_name_the_line() {
        let good =
            br#"{"name":"a","vers":"0.1.0","deps":[],"cksum":"00","features":{},"yanked":false}
{"name":"a","vers":"0.2.0","deps":[],"cksum":"11","features":{},"yanked":true}
"#;
        let entries = parse_index_file(good).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[1].yanked);
        let err = parse_index_file(b"{\"name\":\"a\"}\ngarbage").unwrap_err();
        assert!(err.starts_with("line 1"), "{err}");
    }
}

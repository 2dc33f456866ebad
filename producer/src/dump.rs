//! The crates.io database dump as a source: the tarball of CSV files the registry publishes
//! daily (<https://static.crates.io/db-dump.tar.gz>), read as a stream, never unpacked. It is the
//! fast path for "every version ever published": one file instead of 200,000 index requests, and
//! it carries each version's checksum.
//!
//! The tables are found by name wherever they are in the archive and their columns by header, so
//! a dump with extra columns or tables still reads. crates.io writes the tables in dependency
//! order (`crates` before `versions` before `dependencies`); each pass below reads the archive from
//! the start and stops as soon as it has its table, so only what is needed is decompressed.
//!
//! Memory stays flat as the dump grows: a crate id → name map (about 200,000 entries for all of
//! crates.io), and for "newest version only" one chosen version per crate; every-version runs
//! stream versions straight into pages.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::Context as _;
use quarry_core::job::PackageVersion;

use crate::Sort;
use crate::selection::{Filter, NamePatterns, ReverseDependencies, sample};

/// One page's worth of work: what goes to the producer's publishing loop.
pub type Page = Vec<crate::resolution::Item>;

/// What the dump says of its crates.
#[derive(Debug, Default)]
pub struct Catalogue {
    names: HashMap<u32, Box<str>>,
    downloads: HashMap<u32, u64>,
    /// `metadata.json`'s timestamp: which day's dump this is.
    pub timestamp: Option<String>,
}

impl Catalogue {
    fn id_of(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(id, _)| *id)
    }
}

/// What to take from a dump, and from where to continue.
#[derive(Debug, Clone)]
pub struct DumpSelection<'a> {
    pub path: &'a Path,
    pub filter: &'a Filter,
    pub sort: Sort,
    pub limit: Option<u64>,
    pub page_size: usize,
    /// Items already handed out by an earlier invocation of the same run.
    pub skip: u64,
    /// Where to count the crates the filter and the limit set aside.
    pub filtered_out: &'a std::sync::atomic::AtomicU64,
}

/// The dump's timestamp, read from `metadata.json` (the archive's first file).
pub fn timestamp(path: &Path) -> anyhow::Result<Option<String>> {
    let mut timestamp = None;
    scan(path, |table, reader| {
        if table == "metadata.json" {
            timestamp = read_timestamp(reader)?;
        }
        // metadata.json comes before the data; once a table starts there is none.
        Ok(if table.ends_with(".csv") || timestamp.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    Ok(timestamp)
}

/// Reads the selection out of the dump, handing pages of resolved packages to `send` in a
/// deterministic order; `send` breaks to stop early. Blocking: run it on a blocking thread.
pub fn select(
    selection: &DumpSelection<'_>,
    mut send: impl FnMut(Page) -> ControlFlow<()>,
) -> anyhow::Result<()> {
    let path = selection.path;
    let filter = selection.filter;
    let catalogue = read_catalogue(path, selection.sort == Sort::Downloads)?;
    let patterns = NamePatterns::new(&filter.patterns)?;

    let mut crates: Vec<u32> = catalogue
        .names
        .iter()
        .filter(|(_, name)| patterns.matches(name))
        .map(|(id, _)| *id)
        .collect();
    match selection.sort {
        Sort::Alpha => crates.sort_by(|a, b| catalogue.names[a].cmp(&catalogue.names[b])),
        Sort::Downloads => crates.sort_by(|a, b| {
            let downloads = |id| catalogue.downloads.get(id).copied().unwrap_or(0);
            downloads(b)
                .cmp(&downloads(a))
                .then_with(|| catalogue.names[a].cmp(&catalogue.names[b]))
        }),
    }
    if let Some(limit) = selection.limit {
        crates.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    if let Some(dependents) = &filter.dependents {
        let root = catalogue
            .id_of(&dependents.name)
            .with_context(|| format!("crate {} is not in the database dump", dependents.name))?;
        let found = reverse_dependencies(path, filter)?.of(&root, dependents.depth);
        crates.retain(|id| found.contains(id));
    }
    if let Some(wanted) = filter.sample {
        crates = sample(crates, |id| &catalogue.names[id], wanted);
    }
    let crates: HashSet<u32> = crates.into_iter().collect();
    selection.filtered_out.fetch_add(
        (catalogue.names.len() - crates.len()) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );

    let mut pages = Pager {
        page: Vec::with_capacity(selection.page_size),
        page_size: selection.page_size.max(1),
        skip: selection.skip,
        send: &mut send,
        stopped: false,
    };
    let name_of = |id: u32| -> &str { &catalogue.names[&id] };
    if filter.all_versions {
        for_each_version(path, |row| {
            if !crates.contains(&row.crate_id) {
                return ControlFlow::Continue(());
            }
            if row.allowed_by(filter).is_none() {
                return ControlFlow::Continue(());
            }
            // Every version streams through before the dependencies table is reached: these
            // carry none (the report then has no dependent counts to rank by).
            pages.push(item(
                name_of(row.crate_id),
                row.num,
                row.checksum,
                Vec::new(),
            ))
        })?;
    } else {
        let mut newest: HashMap<u32, Newest> = HashMap::with_capacity(crates.len());
        for_each_version(path, |row| {
            if crates.contains(&row.crate_id) {
                keep_if_newer(&mut newest, filter, &row);
            }
            ControlFlow::Continue(())
        })?;
        let mut chosen: Vec<(u32, Newest)> = newest.into_iter().collect();
        chosen.sort_by(|(a, _), (b, _)| name_of(*a).cmp(name_of(*b)));
        let taken: HashSet<u32> = chosen.iter().map(|(_, n)| n.version_id).collect();
        let mut dependencies = build_dependencies(path, &taken)?;
        for (crate_id, newest) in chosen {
            let num = newest.version.to_string();
            let mut names: Vec<String> = dependencies
                .remove(&newest.version_id)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|id| catalogue.names.get(&id))
                .map(|name| name.to_ascii_lowercase())
                .collect();
            names.sort();
            names.dedup();
            if pages
                .push(item(name_of(crate_id), &num, &newest.checksum, names))
                .is_break()
            {
                break;
            }
        }
    }
    pages.flush();
    Ok(())
}

/// The newest allowed version of a crate seen so far.
struct Newest {
    version: semver::Version,
    checksum: String,
    version_id: u32,
}

fn keep_if_newer(newest: &mut HashMap<u32, Newest>, filter: &Filter, row: &VersionRow<'_>) {
    let Some(version) = row.allowed_by(filter) else {
        return;
    };
    let better = newest
        .get(&row.crate_id)
        .is_none_or(|kept| version > kept.version);
    if better {
        newest.insert(
            row.crate_id,
            Newest {
                version,
                checksum: row.checksum.to_owned(),
                version_id: row.id,
            },
        );
    }
}

fn item(
    name: &str,
    num: &str,
    checksum: &str,
    dependencies: Vec<String>,
) -> crate::resolution::Item {
    if checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        crate::resolution::Item::Resolved {
            package: PackageVersion {
                name: name.to_owned(),
                version: num.to_owned(),
                checksum: checksum.to_owned(),
            },
            dependencies,
        }
    } else {
        crate::resolution::Item::LeftOut {
            package: format!("{name}@{num}"),
            why: "the database dump has no valid checksum for this version".to_owned(),
        }
    }
}

/// Cuts the stream of items into pages, skipping those an earlier invocation handed out.
struct Pager<'a, F> {
    page: Page,
    page_size: usize,
    skip: u64,
    send: &'a mut F,
    stopped: bool,
}

impl<F: FnMut(Page) -> ControlFlow<()>> Pager<'_, F> {
    fn push(&mut self, item: crate::resolution::Item) -> ControlFlow<()> {
        if self.stopped {
            return ControlFlow::Break(());
        }
        if self.skip > 0 {
            self.skip -= 1;
            return ControlFlow::Continue(());
        }
        self.page.push(item);
        if self.page.len() >= self.page_size {
            let page = std::mem::replace(&mut self.page, Vec::with_capacity(self.page_size));
            if (self.send)(page).is_break() {
                self.stopped = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn flush(&mut self) {
        if !self.stopped && !self.page.is_empty() {
            let _ = (self.send)(std::mem::take(&mut self.page));
        }
    }
}

/// The direct normal and build dependencies (crate ids) of each version in `versions`, from
/// `dependencies.csv` (a dev-dependency is left out: it breaks only tests).
fn build_dependencies(
    path: &Path,
    versions: &HashSet<u32>,
) -> anyhow::Result<HashMap<u32, Vec<u32>>> {
    let mut dependencies: HashMap<u32, Vec<u32>> = HashMap::new();
    for_each_dependency(path, |version, crate_id, dev| {
        if !dev && versions.contains(&version) {
            dependencies.entry(version).or_default().push(crate_id);
        }
    })?;
    Ok(dependencies)
}

/// Calls `visit(version id, crate id depended on, whether a dev-dependency)` for each row of
/// `dependencies.csv` (`kind` 2 is a dev-dependency).
fn for_each_dependency(path: &Path, mut visit: impl FnMut(u32, u32, bool)) -> anyhow::Result<()> {
    let mut found = false;
    scan(path, |table, reader| {
        if table != "dependencies.csv" {
            return Ok(ControlFlow::Continue(()));
        }
        found = true;
        let mut rows = csv::Reader::from_reader(reader);
        let [version_id, crate_id, kind] =
            columns(&mut rows, table, ["version_id", "crate_id", "kind"])?;
        let mut record = csv::ByteRecord::new();
        while rows.read_byte_record(&mut record)? {
            visit(
                number(&record, version_id, table)?,
                number(&record, crate_id, table)?,
                record.get(kind) == Some(b"2"),
            );
        }
        Ok(ControlFlow::Break(()))
    })?;
    anyhow::ensure!(
        found,
        "{} has no data/dependencies.csv: is it a crates.io database dump?",
        path.display()
    );
    Ok(())
}

/// Who depends on whom, by crate id, over the versions the filter would take.
fn reverse_dependencies(path: &Path, filter: &Filter) -> anyhow::Result<ReverseDependencies<u32>> {
    // Version id → crate id, for the versions whose dependencies count.
    let mut taken: HashMap<u32, u32> = HashMap::new();
    if filter.all_versions {
        for_each_version(path, |row| {
            if row.allowed_by(filter).is_some() {
                taken.insert(row.id, row.crate_id);
            }
            ControlFlow::Continue(())
        })?;
    } else {
        let mut newest = HashMap::new();
        for_each_version(path, |row| {
            keep_if_newer(&mut newest, filter, &row);
            ControlFlow::Continue(())
        })?;
        taken = newest
            .into_iter()
            .map(|(crate_id, kept)| (kept.version_id, crate_id))
            .collect();
    }
    let mut graph = ReverseDependencies::default();
    for_each_dependency(path, |version, dependency, _| {
        if let Some(dependent) = taken.get(&version) {
            graph.add(*dependent, dependency);
        }
    })?;
    Ok(graph)
}

/// One row of `versions.csv`, borrowed from the reader's buffer.
struct VersionRow<'a> {
    id: u32,
    crate_id: u32,
    num: &'a str,
    yanked: bool,
    checksum: &'a str,
}

impl VersionRow<'_> {
    /// The version, if it is semver and the filter takes it (yanked, pre-release).
    fn allowed_by(&self, filter: &Filter) -> Option<semver::Version> {
        let version = semver::Version::parse(self.num).ok()?;
        filter
            .allows(self.yanked, !version.pre.is_empty())
            .then_some(version)
    }
}

fn for_each_version(
    path: &Path,
    mut visit: impl FnMut(VersionRow<'_>) -> ControlFlow<()>,
) -> anyhow::Result<()> {
    let mut found = false;
    scan(path, |table, reader| {
        if table != "versions.csv" {
            return Ok(ControlFlow::Continue(()));
        }
        found = true;
        let mut rows = csv::Reader::from_reader(reader);
        let [id, crate_id, num, yanked, checksum] = columns(
            &mut rows,
            table,
            ["id", "crate_id", "num", "yanked", "checksum"],
        )?;
        let mut record = csv::ByteRecord::new();
        while rows.read_byte_record(&mut record)? {
            let row = VersionRow {
                id: number(&record, id, table)?,
                crate_id: number(&record, crate_id, table)?,
                num: text(&record, num, table)?,
                yanked: matches!(record.get(yanked), Some(b"t" | b"true")),
                checksum: text(&record, checksum, table)?,
            };
            if visit(row).is_break() {
                break;
            }
        }
        Ok(ControlFlow::Break(()))
    })?;
    anyhow::ensure!(
        found,
        "{} has no data/versions.csv: is it a crates.io database dump?",
        path.display()
    );
    Ok(())
}

/// Crate names (and downloads, when asked for) from `crates.csv` and `crate_downloads.csv`.
fn read_catalogue(path: &Path, with_downloads: bool) -> anyhow::Result<Catalogue> {
    let mut catalogue = Catalogue::default();
    let mut have_names = false;
    let mut have_downloads = !with_downloads;
    scan(path, |table, reader| {
        match table {
            "metadata.json" => catalogue.timestamp = read_timestamp(reader)?,
            "crates.csv" => {
                let mut rows = csv::Reader::from_reader(reader);
                let [id, name] = columns(&mut rows, table, ["id", "name"])?;
                // Older dumps kept the download count in `crates`; newer ones in their own table.
                let downloads = rows.byte_headers()?.iter().position(|h| h == b"downloads");
                let mut record = csv::ByteRecord::new();
                while rows.read_byte_record(&mut record)? {
                    let crate_id = number(&record, id, table)?;
                    catalogue
                        .names
                        .insert(crate_id, text(&record, name, table)?.into());
                    if let Some(column) = downloads.filter(|_| with_downloads) {
                        catalogue
                            .downloads
                            .insert(crate_id, number(&record, column, table)?);
                    }
                }
                have_names = true;
                have_downloads |= downloads.is_some();
            }
            "crate_downloads.csv" if with_downloads => {
                let mut rows = csv::Reader::from_reader(reader);
                let [crate_id, downloads] = columns(&mut rows, table, ["crate_id", "downloads"])?;
                let mut record = csv::ByteRecord::new();
                while rows.read_byte_record(&mut record)? {
                    catalogue.downloads.insert(
                        number(&record, crate_id, table)?,
                        number(&record, downloads, table)?,
                    );
                }
                have_downloads = true;
            }
            _ => {}
        }
        Ok(if have_names && have_downloads {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    anyhow::ensure!(
        have_names,
        "{} has no data/crates.csv: is it a crates.io database dump?",
        path.display()
    );
    anyhow::ensure!(
        have_downloads,
        "{} has no download counts (crate_downloads.csv): cannot sort by downloads",
        path.display()
    );
    Ok(catalogue)
}

fn read_timestamp(reader: &mut dyn Read) -> anyhow::Result<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        timestamp: Option<String>,
    }
    let metadata: Metadata =
        serde_json::from_reader(reader).context("the dump's metadata.json is not valid")?;
    Ok(metadata.timestamp)
}

/// Reads the archive's entries in order, handing each file (by its base name) to `visit` until
/// it breaks.
fn scan(
    path: &Path,
    mut visit: impl FnMut(&str, &mut dyn Read) -> anyhow::Result<ControlFlow<()>>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the database dump {}", path.display()))?;
    let gzip = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut archive = tar::Archive::new(gzip);
    let context = || format!("cannot read the database dump {}", path.display());
    for entry in archive.entries().with_context(context)? {
        let mut entry = entry.with_context(context)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = entry.path().with_context(context)?.into_owned();
        let Some(name) = entry_path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let name = name.to_owned();
        let flow = visit(&name, &mut entry)
            .with_context(|| format!("{}: {}", path.display(), entry_path.display()))?;
        if flow.is_break() {
            break;
        }
    }
    Ok(())
}

/// The positions of `names` among the table's headers.
fn columns<R: Read, const N: usize>(
    rows: &mut csv::Reader<R>,
    table: &str,
    names: [&str; N],
) -> anyhow::Result<[usize; N]> {
    let headers = rows
        .byte_headers()
        .with_context(|| format!("{table} has no header line"))?;
    let mut positions = [0; N];
    for (position, name) in positions.iter_mut().zip(names) {
        *position = headers
            .iter()
            .position(|h| h == name.as_bytes())
            .with_context(|| format!("{table} has no `{name}` column"))?;
    }
    Ok(positions)
}

fn text<'r>(record: &'r csv::ByteRecord, column: usize, table: &str) -> anyhow::Result<&'r str> {
    let line = || record.position().map_or(0, |p| p.line());
    let field = record
        .get(column)
        .with_context(|| format!("{table} line {}: too few columns", line()))?;
    std::str::from_utf8(field).with_context(|| format!("{table} line {}: not UTF-8", line()))
}

fn number<T: std::str::FromStr>(
    record: &csv::ByteRecord,
    column: usize,
    table: &str,
) -> anyhow::Result<T> {
    let field = text(record, column, table)?;
    field.parse().map_err(|_| {
        anyhow::anyhow!(
            "{table} line {}: {field:?} is not a number",
            record.position().map_or(0, |p| p.line())
        )
    })
}

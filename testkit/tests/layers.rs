//! The workspace's layers (ARCHITECTURE.md, "Layers"), read from `cargo metadata`: what each
//! crate builds on, and what it must not know. A dependency that breaks them fails here, and so
//! in CI, with the edge named.

use std::collections::BTreeMap;

/// What each crate may build on among the workspace's own (normal and build dependencies).
/// Tests may use more through dev-dependencies (a program's test starts another to drive it).
const WORKSPACE_EDGES: [(&str, &[&str]); 7] = [
    ("quarry-core", &[]),
    ("quarry-infra", &["quarry-core"]),
    ("quarry-registry", &["quarry-core"]),
    ("quarry-producer", &["quarry-core", "quarry-infra"]),
    ("quarry-consumer", &["quarry-core", "quarry-infra"]),
    ("quarry-reporter", &["quarry-core", "quarry-infra"]),
    (
        "quarry-testkit",
        &[
            "quarry-core",
            "quarry-infra",
            "quarry-registry",
            "quarry-producer",
            "quarry-consumer",
            "quarry-reporter",
        ],
    ),
];

/// The domain's only crates from outside: types and pure logic (errors, data formats, hashes,
/// reading an archive's bytes). No I/O client, async runtime, command line or web framework.
const CORE_MAY_USE: [&str; 10] = [
    "anyhow",
    "thiserror",
    "serde",
    "serde_json",
    "uuid",
    "sha2",
    "hex",
    "toml",
    "tar",
    "flate2",
];

#[test]
fn each_crate_builds_only_on_the_layers_below_it() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Each workspace crate's dependencies that are not only for its tests.
    let mut built_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in metadata["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap().to_owned();
        let deps = package["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|dep| dep["kind"].as_str() != Some("dev"))
            .map(|dep| dep["name"].as_str().unwrap().to_owned())
            .collect();
        built_on.insert(name, deps);
    }
    let ours: Vec<&str> = WORKSPACE_EDGES.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        built_on.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = ours.clone();
            sorted.sort();
            sorted
        },
        "a crate was added or renamed: give it its place in the layers"
    );
    let mut forbidden = Vec::new();
    for (name, allowed) in WORKSPACE_EDGES {
        for dep in &built_on[name] {
            if ours.contains(&dep.as_str()) && !allowed.contains(&dep.as_str()) {
                forbidden.push(format!("{name} -> {dep}"));
            }
        }
    }
    for dep in &built_on["quarry-core"] {
        if !CORE_MAY_USE.contains(&dep.as_str()) {
            forbidden.push(format!(
                "quarry-core -> {dep} (the domain uses no such crate)"
            ));
        }
    }
    assert!(
        forbidden.is_empty(),
        "dependencies that break the layers (ARCHITECTURE.md, \"Layers\"):\n{}",
        forbidden.join("\n")
    );
}

//! The layout principles of DESIGN.md, checked on the source tree: the engine
//! never imports the tooling; the runtime imports no workflow, channel or
//! provider; the SQL of wardcall's own tables lives in `src/store`; providers
//! know nothing of alerts; the acknowledgement rules import no provider.

use std::path::{Path, PathBuf};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        layout::engine_never_imports_the_tooling,
        layout::runtime_knows_no_workflow_channel_or_provider,
        layout::sql_of_wardcall_tables_lives_in_the_store,
        layout::providers_know_nothing_of_alerts_and_rules_know_no_provider,
    ]
}

/// Every `.rs` file under `dir` (relative to the crate root), with its text.
fn sources(dir: &str) -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join(dir), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.strip_prefix(root).unwrap().display().to_string(), text)
        })
        .collect()
}

/// The lines of `text` that are code (not comments), with their numbers.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim_start().starts_with("//"))
}

fn offenders(dir: &str, skip: &[&str], bad: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for (file, text) in sources(dir) {
        if skip.iter().any(|s| file.starts_with(s)) {
            continue;
        }
        for (n, line) in code_lines(&text) {
            if bad(line) {
                found.push(format!("{file}:{n}: {}", line.trim()));
            }
        }
    }
    found
}

pub async fn engine_never_imports_the_tooling() {
    // main.rs is the binary (it runs the demo and the benchmarks); lib.rs declares the module.
    let found = offenders("src", &["src/devtools/", "src/main.rs", "src/lib.rs"], |l| l.contains("devtools"));
    assert!(found.is_empty(), "the engine imports the tooling:\n{}", found.join("\n"));
}

pub async fn runtime_knows_no_workflow_channel_or_provider() {
    let found =
        offenders("src/runtime", &[], |l| ["crate::workflows", "crate::notify", "crate::providers::twilio", "crate::devtools"].iter().any(|m| l.contains(m)));
    assert!(found.is_empty(), "the runtime imports a workflow, channel or provider module:\n{}", found.join("\n"));
}

/// A statement naming a table or function of the `wardcall` schema.
fn names_wardcall_sql(line: &str) -> bool {
    let l = line.to_ascii_uppercase();
    ["FROM WARDCALL.", "INTO WARDCALL.", "UPDATE WARDCALL.", "JOIN WARDCALL.", "SELECT WARDCALL."].iter().any(|p| l.contains(p))
}

pub async fn sql_of_wardcall_tables_lives_in_the_store() {
    let allowed = [
        // The schema itself.
        "src/store/",
        "src/db/",
        // Tooling reads the tables to show and measure them.
        "src/devtools/",
        // The capture trigger's body, installed on the team's tables, writes the outbox.
        "src/capture.rs",
    ];
    let found = offenders("src", &allowed, names_wardcall_sql);
    assert!(found.is_empty(), "SQL of wardcall's tables outside src/store:\n{}", found.join("\n"));
}

pub async fn providers_know_nothing_of_alerts_and_rules_know_no_provider() {
    let found = offenders("src/providers", &[], |l| {
        l.contains("store::alerts") || l.contains("wardcall.alerts") || l.contains("crate::workflows") || l.contains("crate::store")
    });
    assert!(found.is_empty(), "a provider reaches into alerts, workflows or the store:\n{}", found.join("\n"));
    let found = offenders("src/notify", &[], |l| l.contains("crate::providers::twilio") || l.contains("twiml"));
    assert!(found.is_empty(), "the notify layer (acknowledgement rules, channels) names a provider:\n{}", found.join("\n"));
}

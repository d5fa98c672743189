//! The module-cycle half of `cargo xtask audit`: in each library crate, which top-level
//! modules name which others (`crate::x::` anywhere in a module's files, doc links included,
//! unit tests left out; `super::x::` from a file at the top), and the cycles among them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Result;

/// The crates whose modules must not import one another in a circle.
pub const CRATES: [&str; 2] = ["engine/src", "migrate/src"];

/// Which top-level modules of one crate each module names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The graph of the crate whose sources are under `src`.
pub fn graph(src: &Path) -> Result<Graph> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let Some(stem) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if stem == "lib" || stem == "main" {
            continue;
        }
        let list = files.entry(stem).or_default();
        if path.is_dir() {
            super::audit::collect(&path, list)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            list.push(path);
        }
    }
    let mut graph = Graph::new();
    for (module, paths) in &files {
        let names = graph.entry(module.clone()).or_default();
        for path in paths {
            let text = std::fs::read_to_string(path)?;
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let top = path.parent() == Some(src);
            for other in files.keys().filter(|o| *o != module) {
                // `use crate::{a::X, b::Y}` groups are not looked into (the crates have
                // none); a module named by itself (`crate::mm;`) or by a path is.
                let named = text.contains(&format!("crate::{other}::"))
                    || text.contains(&format!("crate::{other};"))
                    || (top && text.contains(&format!("super::{other}::")));
                if named {
                    names.insert(other.clone());
                }
            }
        }
    }
    Ok(graph)
}

/// The cycles of `graph`, each as the modules on it in order (the first one repeated at the
/// end); one per strongly connected group of modules.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let mut found: Vec<Vec<String>> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for start in graph.keys() {
        if seen.contains(start) {
            continue;
        }
        if let Some(path) = path_back(graph, start) {
            seen.extend(path.iter().cloned());
            found.push(path);
        }
    }
    found
}

/// A path from `start` through the graph back to `start`, if there is one (breadth first,
/// so the shortest).
fn path_back(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(at) = queue.pop_front() {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                // Back from `at` to `start`, then turned round.
                let mut middle = vec![at.to_string()];
                let mut back = at;
                while let Some(&prev) = came_from.get(back) {
                    middle.push(prev.to_string());
                    back = prev;
                }
                middle.pop();
                middle.reverse();
                let mut path = vec![start.to_string()];
                path.extend(middle);
                path.push(start.to_string());
                return Some(path);
            }
            if next != start && !came_from.contains_key(next.as_str()) {
                came_from.insert(next, at);
                queue.push_back(next);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_of(edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::new();
        for &(a, b) in edges {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        }
        g
    }

    #[test]
    fn a_cycle_is_found_in_edge_order_and_a_chain_is_not_one() {
        let chain = graph_of(&[("device", "kernel"), ("kernel", "pfn"), ("device", "pfn")]);
        assert!(cycles(&chain).is_empty());
        let two = graph_of(&[
            ("device", "kernel"),
            ("kernel", "device"),
            ("kernel", "pfn"),
        ]);
        assert_eq!(cycles(&two), vec![vec!["device", "kernel", "device"]]);
        let three = graph_of(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]);
        assert_eq!(cycles(&three), vec![vec!["a", "b", "c", "a"]]);
    }

    #[test]
    fn the_crates_have_no_module_cycles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for src in CRATES {
            let g = graph(&root.join(src)).unwrap();
            assert!(g.len() > 3, "{src}: modules not found");
            assert_eq!(cycles(&g), Vec::<Vec<String>>::new(), "{src}");
        }
    }
}

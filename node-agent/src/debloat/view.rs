//! What a debloated image keeps, decided without IO: the merged root
//! filesystem of an image's layers ([`View`]), the closure of a profile over
//! it ([`closure`]: every accessed path, its parent directories, the symlinks
//! on the way and those that lead to it, hard-link targets and the keep-list),
//! and the per-layer decision for each tar entry ([`plan`]).

use std::collections::{BTreeMap, BTreeSet};

use super::tar::Kind;

/// One entry of a layer, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalised path (see [`super::tar::normalise`]).
    pub path: String,
    /// What the entry is.
    pub kind: Kind,
    /// Bytes of data.
    pub size: u64,
}

/// Paths kept whatever the profile says: what name lookups, TLS and time
/// zones read, and the mount points and scratch directories programs expect.
/// `*` matches within one path component, a trailing `/**` a whole subtree.
pub const DEFAULT_KEEP: &[&str] = &[
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "etc/gshadow",
    "etc/nsswitch.conf",
    "etc/hosts",
    "etc/host.conf",
    "etc/resolv.conf",
    "etc/hostname",
    "etc/localtime",
    "etc/timezone",
    "etc/os-release",
    "usr/lib/os-release",
    "etc/ld.so.cache",
    "etc/ld.so.conf",
    "etc/ld.so.conf.d/**",
    "etc/ssl/certs/ca-certificates.crt",
    "etc/ssl/cert.pem",
    "etc/pki/tls/certs/ca-bundle.crt",
    "usr/lib/*/libnss_files*",
    "usr/lib/*/libnss_dns*",
    "lib/*/libnss_files*",
    "lib/*/libnss_dns*",
    "tmp",
    "var/tmp",
    "run",
    "dev",
    "proc",
    "sys",
    "root",
];

/// The merged root filesystem: each path and the layer that provides it.
#[derive(Debug, Default)]
pub struct View {
    nodes: BTreeMap<String, (Kind, usize)>,
}

impl View {
    /// Applies the layers in order, whiteouts first within each layer.
    pub fn build(layers: &[Vec<Entry>]) -> View {
        let mut view = View::default();
        for (i, layer) in layers.iter().enumerate() {
            for e in layer {
                match &e.kind {
                    Kind::Whiteout(p) => {
                        view.nodes.remove(p);
                        view.remove_under(p);
                    }
                    Kind::Opaque(d) => view.remove_under(d),
                    _ => {}
                }
            }
            for e in layer {
                match &e.kind {
                    Kind::Whiteout(_) | Kind::Opaque(_) | Kind::Global => {}
                    Kind::Dir => {
                        if !matches!(view.nodes.get(&e.path), Some((Kind::Dir, _))) {
                            view.remove_under(&e.path);
                        }
                        view.nodes.insert(e.path.clone(), (Kind::Dir, i));
                    }
                    other => {
                        view.remove_under(&e.path);
                        view.nodes.insert(e.path.clone(), (other.clone(), i));
                    }
                }
                // A tar need not list the parents of its entries; the
                // runtime creates them, so the view does too.
                let mut at = e.path.as_str();
                while let Some((parent, _)) = at.rsplit_once('/') {
                    view.nodes
                        .entry(parent.to_string())
                        .or_insert((Kind::Dir, i));
                    at = parent;
                }
            }
        }
        view
    }

    fn remove_under(&mut self, dir: &str) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// The kind and providing layer of `path`.
    pub fn get(&self, path: &str) -> Option<&(Kind, usize)> {
        self.nodes.get(path)
    }

    /// Every path of the merged filesystem.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Follows `path` (absolute or relative to the root) through symlinks
    /// as the kernel would; pushes each symlink passed to `via`. `None` when
    /// a component is missing or the links loop.
    pub fn resolve(&self, path: &str, via: &mut Vec<String>) -> Option<String> {
        let mut todo: Vec<String> = components(path).rev().map(str::to_string).collect();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                done.pop();
                continue;
            }
            done.push(part);
            let here = done.join("/");
            match self.nodes.get(&here) {
                Some((Kind::Symlink(target), _)) => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    via.push(here);
                    done.pop();
                    if target.starts_with('/') {
                        done.clear();
                    }
                    todo.extend(components(target).rev().map(str::to_string));
                }
                Some(_) => {}
                None => return None,
            }
        }
        Some(done.join("/"))
    }
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|p| !p.is_empty() && *p != ".")
}

/// Whether `path` matches a keep-list `pattern` (see [`DEFAULT_KEEP`]).
pub fn matches(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches('/');
    let (pattern, subtree) = match pattern.strip_suffix("/**") {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    let want: Vec<&str> = components(pattern).collect();
    let have: Vec<&str> = components(path).collect();
    if have.len() < want.len() || (!subtree && have.len() != want.len()) {
        return false;
    }
    want.iter()
        .zip(&have)
        .all(|(w, h)| glob(w.as_bytes(), h.as_bytes()))
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// The paths of `view` a debloated image keeps, parents included.
/// `accessed` are paths as the container saw them (absolute); `keep` are
/// keep-list patterns.
pub fn closure<'a>(
    view: &'a View,
    accessed: impl IntoIterator<Item = &'a str>,
    keep: &[String],
) -> BTreeSet<String> {
    let mut kept = BTreeSet::new();
    let add = |kept: &mut BTreeSet<String>, path: &str| {
        let mut at = path;
        while kept.insert(at.to_string()) {
            match at.rsplit_once('/') {
                Some((parent, _)) => at = parent,
                None => break,
            }
        }
    };
    let listed: Vec<&str> = view
        .paths()
        .filter(|p| keep.iter().any(|k| matches(k, p)))
        .collect();
    for path in accessed.into_iter().chain(listed) {
        let mut via = Vec::new();
        let found = view.resolve(path, &mut via);
        for link in &via {
            add(&mut kept, link);
        }
        if let Some(found) = found
            && view.get(&found).is_some()
        {
            add(&mut kept, &found);
        }
    }
    // Files a program only stats, never opens, which fanotify cannot see:
    // Python finds a module by its source and then reads the bytecode.
    let sources: Vec<String> = kept.iter().filter_map(|p| python_source(p)).collect();
    for source in sources {
        if view.get(&source).is_some() {
            add(&mut kept, &source);
        }
    }
    // Hard-link targets, and the symlinks that lead to something kept (the
    // profile names files by their resolved path, not the link used).
    loop {
        let mut more = Vec::new();
        for (path, (kind, _)) in &view.nodes {
            match kind {
                Kind::Hardlink(target) if kept.contains(path) && !kept.contains(target) => {
                    more.push(target.clone())
                }
                Kind::Symlink(_) if !kept.contains(path) => {
                    let mut via = Vec::new();
                    if let Some(found) = view.resolve(path, &mut via)
                        && kept.contains(&found)
                    {
                        more.extend(via);
                    }
                }
                _ => {}
            }
        }
        if more.is_empty() {
            break;
        }
        for path in more {
            add(&mut kept, &path);
        }
    }
    kept.insert(String::new());
    kept
}

/// The source of a Python bytecode file: `d/__pycache__/m.cpython-311.pyc`
/// is found through `d/m.py`.
pub fn python_source(path: &str) -> Option<String> {
    let (dir, file) = path.rsplit_once('/')?;
    let parent = dir.strip_suffix("__pycache__")?.trim_end_matches('/');
    let stem = file.strip_suffix(".pyc")?.split('.').next()?;
    Some(if parent.is_empty() {
        format!("{stem}.py")
    } else {
        format!("{parent}/{stem}.py")
    })
}

/// For each layer from `first` on, which of its entries to keep (`None`
/// for the layers below `first`, left as they are).
pub fn plan(
    layers: &[Vec<Entry>],
    view: &View,
    kept: &BTreeSet<String>,
    first: usize,
) -> Vec<Option<Vec<bool>>> {
    let mut forced: Vec<BTreeSet<String>> = vec![BTreeSet::new(); layers.len()];
    let mut out: Vec<Option<Vec<bool>>> = Vec::new();
    // Hard links name an entry of the same or a lower layer; keep that one
    // too. Two rounds settle a link to a link.
    for _ in 0..2 {
        out.clear();
        for (i, layer) in layers.iter().enumerate() {
            if i < first {
                out.push(None);
                continue;
            }
            let keep: Vec<bool> = layer
                .iter()
                .map(|e| match &e.kind {
                    // A whiteout matters only where something is kept.
                    Kind::Whiteout(p) => kept.contains(p.rsplit_once('/').map_or("", |(d, _)| d)),
                    Kind::Opaque(d) => kept.contains(d),
                    Kind::Global => true,
                    Kind::Dir => kept.contains(&e.path),
                    _ => {
                        forced[i].contains(&e.path)
                            || (kept.contains(&e.path)
                                && view.get(&e.path).is_some_and(|(_, at)| *at == i))
                    }
                })
                .collect();
            for (e, k) in layer.iter().zip(&keep) {
                if let (true, Kind::Hardlink(target)) = (k, &e.kind)
                    && let Some(j) = (0..=i).rev().find(|j| {
                        layers[*j].iter().any(|x| {
                            x.path == *target
                                && !matches!(x.kind, Kind::Whiteout(_) | Kind::Opaque(_))
                        })
                    })
                {
                    forced[j].insert(target.clone());
                }
            }
            out.push(Some(keep));
        }
    }
    out
}

#[cfg(test)]
mod tests;

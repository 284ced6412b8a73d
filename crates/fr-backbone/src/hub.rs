//! Hugging Face Hub repositories as a source of weights, through the hf-hub crate (its
//! blocking client; cargo feature `hub`, on by default).
//!
//! Files are looked up in the local cache first, in the layout `huggingface_hub` (Python) and
//! hf-hub share:
//!
//! ```text
//! <cache>/models--<owner>--<name>/refs/<revision>             the commit the revision points at
//! <cache>/models--<owner>--<name>/snapshots/<commit>/<file>   the file (usually a link to blobs/)
//! <cache>/models--<owner>--<name>/blobs/<etag>
//! ```
//!
//! `<cache>` is [`HubOptions::cache_dir`], else `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (huggingface_hub's order).
//! A file that is not cached is downloaded into the cache, unless offline mode is on
//! ([`HubOptions::offline`] or `HF_HUB_OFFLINE=1`): then the error names the repository, the
//! file and the directory it was looked for in. `HF_ENDPOINT` and `HF_TOKEN` (or the cache's
//! `token` file) are honoured.
//!
//! hf-hub's cache API resolves a revision only through `refs/<revision>`; a revision given as a
//! commit hash is resolved here directly to `snapshots/<commit>/` (huggingface_hub does the
//! same), and the snapshot's file list (to pick a weights file offline) is read here too.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How to reach the Hub. `Default` is online, the standard cache, no token beyond the
/// environment's, with a progress bar for downloads.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Never use the network: only cached files are found. `HF_HUB_OFFLINE=1` (or `true`,
    /// `yes`, `on`) turns it on as well.
    pub offline: bool,
    /// The cache directory (the `hub` folder itself); `None`: from the environment.
    pub cache_dir: Option<PathBuf>,
    /// The Hub's address; `None`: `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// An access token for private or gated repositories; `None`: `HF_TOKEN`, else the
    /// cache's `token` file.
    pub token: Option<String>,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            offline: false,
            cache_dir: None,
            endpoint: None,
            token: None,
            progress: true,
        }
    }
}

/// Whether `HF_HUB_OFFLINE` asks for offline mode (`1`, `true`, `yes`, `on`, any case).
pub fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl HubOptions {
    /// Offline mode: this option or `HF_HUB_OFFLINE`.
    pub fn is_offline(&self) -> bool {
        self.offline || env_offline()
    }

    /// The cache directory in use (see the module documentation for the order).
    pub fn resolved_cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Some(d) = env_path("HF_HUB_CACHE") {
            return d;
        }
        if let Some(d) = env_path("HF_HOME") {
            return d.join("hub");
        }
        let cache = env_path("XDG_CACHE_HOME").unwrap_or_else(|| {
            env_path("HOME")
                .or_else(|| env_path("USERPROFILE"))
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache")
        });
        cache.join("huggingface").join("hub")
    }
}

/// `owner/name` (or a legacy `name`) with the Hub's characters only.
///
/// # Errors
/// [`Error::Config`] (`repo`) for anything else.
pub fn validate_repo_id(id: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() <= 2 && parts.iter().all(|p| ok_part(p)) {
        Ok(())
    } else {
        Err(Error::config(
            "repo",
            format!("{id:?} is not a Hub repository id (owner/name)"),
        ))
    }
}

/// `<cache>/models--owner--name`.
pub fn repo_cache_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Whether `rev` is a full commit hash (40 hexadecimal digits).
fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot directory `revision` resolves to in the cache, or `Err` with the path that
/// was missing (the ref file, or the snapshot directory).
pub fn cached_snapshot(
    cache: &Path,
    repo: &str,
    revision: &str,
) -> std::result::Result<PathBuf, PathBuf> {
    let dir = repo_cache_dir(cache, repo);
    let ref_path = dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        Err(_) if is_commit(revision) => revision.to_string(),
        Err(_) => return Err(ref_path),
    };
    let snapshot = dir.join("snapshots").join(commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(snapshot)
    }
}

/// A file of `repo` at `revision` in the cache: `Ok(path)`, or `Err(where it was looked for)`.
/// Goes through hf-hub's `CacheRepo::get` (with the `hub` feature) and falls back to this
/// module's resolution for commit-hash revisions.
pub fn cached_file(
    cache: &Path,
    repo: &str,
    revision: &str,
    file: &str,
) -> std::result::Result<PathBuf, PathBuf> {
    #[cfg(feature = "hub")]
    {
        let hf = hf_hub::Cache::new(cache.to_path_buf()).repo(hf_hub::Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        ));
        if let Some(p) = hf.get(file) {
            return Ok(p);
        }
    }
    let snapshot = cached_snapshot(cache, repo, revision)?;
    let path = snapshot.join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(snapshot)
    }
}

/// Every file of the cached snapshot of `repo` at `revision` (paths relative to the snapshot,
/// `/`-separated, sorted); `None` when the revision is not cached.
pub fn cached_files(cache: &Path, repo: &str, revision: &str) -> Option<Vec<String>> {
    let root = cached_snapshot(cache, repo, revision).ok()?;
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.exists() {
                let rel = path.strip_prefix(&root).ok()?;
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    Some(out)
}

/// One Hub repository at one revision, with the options to reach it.
#[derive(Debug, Clone)]
pub struct HubRepo {
    /// `owner/name`.
    pub id: String,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
    /// Cache, offline mode, endpoint, token.
    pub options: HubOptions,
}

impl HubRepo {
    /// `id` at `revision` (`None`: `main`).
    ///
    /// # Errors
    /// [`Error::Config`] for a malformed repository id.
    pub fn new(id: &str, revision: Option<&str>, options: HubOptions) -> Result<Self> {
        validate_repo_id(id)?;
        Ok(Self {
            id: id.to_string(),
            revision: revision.unwrap_or("main").to_string(),
            options,
        })
    }

    /// `hf://owner/name@revision`.
    pub fn uri(&self) -> String {
        format!("hf://{}@{}", self.id, self.revision)
    }

    fn hub_error(&self, file: &str, reason: impl Into<String>) -> Error {
        Error::Hub {
            repo: self.id.clone(),
            revision: self.revision.clone(),
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// The local path of `file` (a path inside the repository): from the cache, else
    /// downloaded into it.
    ///
    /// # Errors
    /// [`Error::HubFileMissing`] when offline and not cached (naming the directory looked in);
    /// [`Error::Hub`] when the download fails (the repository has no such file, network,
    /// authentication).
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        match self.get_optional(file)? {
            Some(p) => Ok(p),
            None => Err(self.hub_error(file, "not in the repository (HTTP 404)")),
        }
    }

    /// Like [`get`](Self::get), but `Ok(None)` when the repository has no such file.
    ///
    /// # Errors
    /// As [`get`](Self::get), except for a file the Hub reports as absent.
    pub fn get_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        let cache = self.options.resolved_cache_dir();
        let looked_in = match cached_file(&cache, &self.id, &self.revision, file) {
            Ok(p) => return Ok(Some(p)),
            Err(dir) => dir,
        };
        if self.options.is_offline() {
            return Err(Error::HubFileMissing {
                repo: self.id.clone(),
                revision: self.revision.clone(),
                file: file.to_string(),
                looked_in,
                offline: true,
            });
        }
        self.download(&cache, file)
    }

    /// Whether `file` is in the cache (never touches the network).
    pub fn is_cached(&self, file: &str) -> bool {
        cached_file(
            &self.options.resolved_cache_dir(),
            &self.id,
            &self.revision,
            file,
        )
        .is_ok()
    }

    /// The repository's files: from the Hub, or offline from the cached snapshot.
    ///
    /// # Errors
    /// [`Error::HubFileMissing`] when offline and the revision is not cached;
    /// [`Error::Hub`] when the listing request fails.
    pub fn files(&self) -> Result<Vec<String>> {
        let cache = self.options.resolved_cache_dir();
        if self.options.is_offline() {
            return cached_files(&cache, &self.id, &self.revision).ok_or_else(|| {
                Error::HubFileMissing {
                    repo: self.id.clone(),
                    revision: self.revision.clone(),
                    file: "(any file)".to_string(),
                    looked_in: cached_snapshot(&cache, &self.id, &self.revision)
                        .unwrap_or_else(|p| p),
                    offline: true,
                }
            });
        }
        self.list_remote(&cache)
    }

    #[cfg(feature = "hub")]
    fn api(&self, cache: &Path) -> Result<hf_hub::api::sync::ApiRepo> {
        let cache = hf_hub::Cache::new(cache.to_path_buf());
        let token = self
            .options
            .token
            .clone()
            .or_else(|| std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
            .or_else(|| cache.token());
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(self.options.progress)
            .with_token(token);
        let endpoint = self
            .options
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()));
        if let Some(e) = endpoint {
            builder = builder.with_endpoint(e);
        }
        let api = builder
            .build()
            .map_err(|e| self.hub_error("(client)", e.to_string()))?;
        Ok(api.repo(hf_hub::Repo::with_revision(
            self.id.clone(),
            hf_hub::RepoType::Model,
            self.revision.clone(),
        )))
    }

    #[cfg(feature = "hub")]
    fn explain(&self, file: &str, e: hf_hub::api::sync::ApiError) -> Error {
        use hf_hub::api::sync::ApiError;
        let reason = match &e {
            ApiError::RequestError(r) => match r.as_ref() {
                ureq::Error::Status(401 | 403, _) => {
                    format!("{e} (no such repository, or a private / gated one: set HF_TOKEN)")
                }
                _ => e.to_string(),
            },
            _ => e.to_string(),
        };
        self.hub_error(file, reason)
    }

    #[cfg(feature = "hub")]
    fn download(&self, cache: &Path, file: &str) -> Result<Option<PathBuf>> {
        use hf_hub::api::sync::ApiError;
        tracing::info!(repo = %self.uri(), file, "downloading from the Hugging Face Hub");
        match self.api(cache)?.download(file) {
            Ok(p) => Ok(Some(p)),
            Err(ApiError::RequestError(r)) if matches!(r.as_ref(), ureq::Error::Status(404, _)) => {
                Ok(None)
            }
            Err(e) => Err(self.explain(file, e)),
        }
    }

    #[cfg(feature = "hub")]
    fn list_remote(&self, cache: &Path) -> Result<Vec<String>> {
        let info = self
            .api(cache)?
            .info()
            .map_err(|e| self.explain("(repository listing)", e))?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(files)
    }

    #[cfg(not(feature = "hub"))]
    fn download(&self, _cache: &Path, file: &str) -> Result<Option<PathBuf>> {
        Err(self.hub_error(
            file,
            "fr-backbone was built without its `hub` feature: only cached files are found",
        ))
    }

    #[cfg(not(feature = "hub"))]
    fn list_remote(&self, _cache: &Path) -> Result<Vec<String>> {
        Err(self.hub_error(
            "(repository listing)",
            "fr-backbone was built without its `hub` feature: only cached files are found",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["owner/name", "a-b/c.d_e", "gpt2"] {
            validate_repo_id(ok).unwrap();
        }
        for bad in ["", "a/b/c", "../x", "a/..", "o/n ame", "/x", "a/"] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            repo_cache_dir(Path::new("c"), "o/n"),
            Path::new("c/models--o--n")
        );
    }
}

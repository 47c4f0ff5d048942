//! Who may act as an agent: each agent's own secret, listed by hash in
//! `gateway.agents-file`, so that one agent can be revoked without
//! re-issuing everyone's; and the shared `gateway.agent-credential` of
//! earlier versions, for deployments that have not moved yet.
//!
//! The file has one agent per line, `<agent-id> <sha256 of the secret, hex>`
//! (`#` starts a comment); `confab agents add <id>` makes a secret and
//! appends its line, `confab agents revoke <id>` removes it. Secrets are
//! random 256-bit strings, so a plain SHA-256 is enough to keep the file
//! from revealing them. The gateway reads the file again once a second and
//! takes it when its text changed (not its modification time, which a
//! rewrite within one clock tick leaves as it was): removing an agent's line
//! refuses their secret and every chat token issued to them from then on,
//! on every gateway that reads the file.

use crate::auth::constant_time_eq;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agent id of the shared credential.
pub const SHARED: &str = "shared";

/// How often the file is read again.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No agent credential of any kind is configured.
    Off,
    Unknown,
}

pub struct Agents {
    shared: Option<String>,
    file: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

#[derive(Default)]
struct Loaded {
    /// Secret hash (hex) → agent id.
    by_hash: HashMap<String, String>,
    /// The text `by_hash` was read from.
    text: String,
    checked: Option<Instant>,
}

pub fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The agents of a file's text; a malformed line is an error naming it.
fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut by_hash = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(id), Some(digest), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "line {}: expected `<agent-id> <sha256 hex>`",
                n + 1
            ));
        };
        if !valid_id(id) || id == SHARED {
            return Err(format!(
                "line {}: agent id {id:?}: letters, digits, '-', '_', '.' or '@', not \"{SHARED}\"",
                n + 1
            ));
        }
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: not a SHA-256 in hex", n + 1));
        }
        by_hash.insert(digest.to_ascii_lowercase(), id.to_owned());
    }
    Ok(by_hash)
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

impl Agents {
    /// Read `file` now: a gateway does not start with an unreadable one.
    pub fn new(shared: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Agents> {
        let agents = Agents {
            shared,
            file,
            loaded: Mutex::new(Loaded::default()),
        };
        if let Some(path) = &agents.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("gateway.agents-file {}: {e}", path.display()))?;
            let by_hash = parse(&text)
                .map_err(|e| anyhow::anyhow!("gateway.agents-file {}: {e}", path.display()))?;
            let mut loaded = agents.loaded.lock();
            loaded.by_hash = by_hash;
            loaded.text = text;
            loaded.checked = Some(Instant::now());
        }
        Ok(agents)
    }

    /// Whether any agent can sign in.
    pub fn configured(&self) -> bool {
        self.shared.is_some() || self.file.is_some()
    }

    /// The agent whose secret `given` is.
    pub fn authenticate(&self, given: &str) -> Result<String, Refused> {
        if !self.configured() {
            return Err(Refused::Off);
        }
        if let Some(shared) = &self.shared {
            if constant_time_eq(given.as_bytes(), shared.as_bytes()) {
                return Ok(SHARED.to_owned());
            }
        }
        self.reload_if_changed();
        self.loaded
            .lock()
            .by_hash
            .get(&hash(given))
            .cloned()
            .ok_or(Refused::Unknown)
    }

    /// Whether `id` may still act (its line is in the file, or it is the
    /// shared credential's and that is still configured).
    pub fn active(&self, id: &str) -> bool {
        if id == SHARED {
            return self.shared.is_some();
        }
        self.reload_if_changed();
        self.loaded.lock().by_hash.values().any(|a| a == id)
    }

    fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        let mut loaded = self.loaded.lock();
        if loaded.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return;
        }
        loaded.checked = Some(Instant::now());
        let text = match std::fs::read_to_string(path) {
            Ok(text) if text == loaded.text => return,
            other => other.map_err(|e| e.to_string()),
        };
        match text.and_then(|t| parse(&t).map(|by_hash| (t, by_hash))) {
            Ok((text, by_hash)) => {
                tracing::info!(file = %path.display(), agents = by_hash.len(), "agents file read again");
                loaded.by_hash = by_hash;
                loaded.text = text;
            }
            // Keep the agents we had: a half-written file must not lock
            // everyone out (nor let anyone in).
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "agents file unreadable; keeping the agents read before")
            }
        }
    }
}

/// `confab agents add <id>`: a new random secret for `id`, appended to
/// `file` by hash; the secret is returned to be handed to the agent.
pub fn add(file: &Path, id: &str) -> anyhow::Result<String> {
    if !valid_id(id) || id == SHARED {
        anyhow::bail!(
            "agent id {id:?}: letters, digits, '-', '_', '.' or '@' (at most 64), not \"{SHARED}\""
        );
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let existing = parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if existing.values().any(|a| a == id) {
        anyhow::bail!(
            "{} already lists agent {id}; remove its line first to give it a new secret",
            file.display()
        );
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut text = text;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{id} {}\n", hash(&secret)));
    crate::supervisor::data_dir::write_private(file, &text)?;
    Ok(secret)
}

/// `confab agents revoke <id>`: remove `id`'s line from `file` (comments
/// and the other agents' lines kept as they are). Every gateway reading the
/// file refuses the agent's secret and chat tokens within a second or two.
pub fn revoke(file: &Path, id: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let names = |line: &&str| {
        line.split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            == Some(id)
    };
    if !text.lines().any(|l| names(&l)) {
        anyhow::bail!("{} lists no agent {id}", file.display());
    }
    let kept: String = text
        .lines()
        .filter(|l| !names(l))
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(crate::supervisor::data_dir::write_private(file, &kept)?)
}

/// `confab agents list`: the agent ids `file` lists, sorted.
pub fn list(file: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut ids: Vec<String> = parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        .into_values()
        .collect();
    ids.sort();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_signs_in_with_their_own_secret_until_their_line_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agents");
        let ann = add(&file, "ann").unwrap();
        let bob = add(&file, "bob").unwrap();
        assert!(add(&file, "ann").is_err(), "a second secret for ann");
        let agents = Agents::new(Some("shared-secret".into()), Some(file.clone())).unwrap();
        assert_eq!(agents.authenticate(&ann), Ok("ann".into()));
        assert_eq!(agents.authenticate(&bob), Ok("bob".into()));
        assert_eq!(agents.authenticate("shared-secret"), Ok(SHARED.into()));
        assert_eq!(agents.authenticate("guess"), Err(Refused::Unknown));
        // Revoke ann: her line goes; the file is read again at once (no
        // wait for the clock: the text changed).
        revoke(&file, "ann").unwrap();
        assert!(revoke(&file, "ann").is_err(), "ann is gone already");
        assert_eq!(list(&file).unwrap(), vec!["bob".to_owned()]);
        agents.loaded.lock().checked = None;
        assert_eq!(agents.authenticate(&ann), Err(Refused::Unknown));
        assert!(!agents.active("ann") && agents.active("bob") && agents.active(SHARED));
        // A new secret under the same id, written at once: the old one is
        // refused though the file's length is the same.
        let before = std::fs::read_to_string(&file).unwrap();
        revoke(&file, "bob").unwrap();
        let bob2 = add(&file, "bob").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap().len(), before.len());
        agents.loaded.lock().checked = None;
        assert_eq!(agents.authenticate(&bob), Err(Refused::Unknown));
        assert_eq!(agents.authenticate(&bob2), Ok("bob".into()));
        // A broken file keeps the agents read before.
        std::fs::write(&file, "bob not-a-hash\n").unwrap();
        agents.loaded.lock().checked = None;
        assert_eq!(agents.authenticate(&bob2), Ok("bob".into()));
    }

    #[test]
    fn malformed_files_name_the_line() {
        assert!(parse("ann 00\n").unwrap_err().contains("line 1"));
        assert!(parse(&format!("# x\n\nshared {}\n", hash("s")))
            .unwrap_err()
            .contains("line 3"));
        assert!(parse(&format!("ann {} extra\n", hash("s"))).is_err());
        assert_eq!(
            parse(&format!("ann {} # desk 4\n", hash("s")))
                .unwrap()
                .len(),
            1
        );
    }
}

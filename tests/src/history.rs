//! The history checker of the fault tests: every acknowledged message
//! appears exactly once in its chat's stored transcript, in the order it
//! was acknowledged. Messages stored but never acknowledged (a request
//! whose answer was lost, never retried) are allowed; the checker speaks
//! only for what a client was told was kept.

/// What is wrong with one chat's history: `acked` are the texts in the
/// order their acknowledgements came, `stored` the message texts of the
/// transcript as read back. Empty when nothing is.
pub fn problems(chat: &str, acked: &[String], stored: &[String]) -> Vec<String> {
    let mut count: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for t in stored {
        *count.entry(t.as_str()).or_default() += 1;
    }
    let mut found = Vec::new();
    for t in acked {
        match count.get(t.as_str()) {
            None => found.push(format!("{chat}: lost {t:?}")),
            Some(n) if *n > 1 => found.push(format!("{chat}: {t:?} {n} times")),
            _ => {}
        }
    }
    if found.is_empty() {
        let acked_set: std::collections::HashSet<&str> = acked.iter().map(String::as_str).collect();
        let order: Vec<&str> = stored
            .iter()
            .map(String::as_str)
            .filter(|t| acked_set.contains(t))
            .collect();
        let expected: Vec<&str> = acked.iter().map(String::as_str).collect();
        if order != expected {
            found.push(format!(
                "{chat}: acknowledged in the order {expected:?}, stored in the order {order:?}"
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::problems;

    fn texts(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_faithful_history_passes_also_with_unacknowledged_extras() {
        let acked = texts(&["a", "b", "c"]);
        assert!(problems("c1", &acked, &texts(&["a", "b", "c"])).is_empty());
        assert!(problems("c1", &acked, &texts(&["a", "x", "b", "c"])).is_empty());
        assert!(problems("c1", &[], &[]).is_empty());
    }

    #[test]
    fn a_lost_message_fails() {
        let p = problems("c1", &texts(&["a", "b", "c"]), &texts(&["a", "c"]));
        assert_eq!(p, ["c1: lost \"b\""]);
    }

    #[test]
    fn a_duplicated_message_fails() {
        let p = problems("c1", &texts(&["a", "b"]), &texts(&["a", "b", "b"]));
        assert_eq!(p, ["c1: \"b\" 2 times"]);
    }

    #[test]
    fn a_reordered_message_fails() {
        let p = problems("c1", &texts(&["a", "b", "c"]), &texts(&["a", "c", "b"]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("order"), "{p:?}");
    }
}

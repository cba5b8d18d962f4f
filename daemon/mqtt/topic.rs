//! MQTT topic filters, and which level of a topic is the device id.

#[derive(Debug, Clone, PartialEq)]
pub struct TopicFilter {
    filter: String,
    levels: Vec<String>,
    /// Index of the first `+` level: the device id.
    device_level: Option<usize>,
}

impl TopicFilter {
    /// # Errors
    /// Malformed wildcards (a `#` not last, a `+` or `#` sharing a level), or an empty filter.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("expected an MQTT topic filter, found an empty string".into());
        }
        let levels: Vec<String> = filter.split('/').map(str::to_string).collect();
        for (i, l) in levels.iter().enumerate() {
            if l.len() > 1 && l.contains(['+', '#']) {
                return Err(format!("level {l:?}: '+' and '#' must stand alone in a level"));
            }
            if l == "#" && i + 1 != levels.len() {
                return Err("'#' may only be the last level".into());
            }
        }
        let device_level = levels.iter().position(|l| l == "+");
        Ok(TopicFilter { filter: filter.to_string(), levels, device_level })
    }

    pub fn as_str(&self) -> &str {
        &self.filter
    }

    /// `Some(device)` when `topic` matches; the device is "" when the filter has no `+`.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut device = "";
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if level == "#" {
                return Some(device);
            }
            let part = parts.next()?;
            match level.as_str() {
                "+" => {
                    if Some(i) == self.device_level {
                        device = part;
                    }
                }
                l if l == part => {}
                _ => return None,
            }
        }
        parts.next().is_none().then_some(device)
    }
}

/// The topic filter of a Sparkplug B source: every device of `edge_node` in `group` (either
/// may be `+`).
pub fn sparkplug_filter(group: &str, edge_node: &str) -> String {
    format!("spBv1.0/{group}/+/{edge_node}/#")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plus_level_is_the_device() {
        let f = TopicFilter::parse("plant/line3/+/telemetry").unwrap();
        assert_eq!(f.matches("plant/line3/pump7/telemetry"), Some("pump7"));
        assert_eq!(f.matches("plant/line3/pump7/status"), None);
        assert_eq!(f.matches("plant/line3/pump7/telemetry/x"), None);
        assert_eq!(f.matches("plant/line3/telemetry"), None);
    }

    #[test]
    fn hash_matches_the_rest() {
        let f = TopicFilter::parse("plant/+/#").unwrap();
        assert_eq!(f.matches("plant/a/b/c"), Some("a"));
        assert_eq!(f.matches("plant/a"), Some("a"));
    }

    #[test]
    fn malformed_filters_are_refused() {
        assert!(TopicFilter::parse("plant/#/x").is_err());
        assert!(TopicFilter::parse("plant/a+/x").is_err());
        assert!(TopicFilter::parse("").is_err());
    }
}

//! A small reader over `toml::Table` that records every problem instead of stopping at the
//! first, and reports the keys nobody asked for as unknown.

use std::collections::BTreeMap;

use super::ConfigError;

pub(super) struct Section<'e> {
    table: toml::Table,
    path: String,
    errors: &'e mut Vec<ConfigError>,
    failed: bool,
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

impl<'e> Section<'e> {
    pub fn new(table: toml::Table, path: String, errors: &'e mut Vec<ConfigError>) -> Self {
        Section { table, path, errors, failed: false }
    }

    /// The dotted path of `key` in this section, as errors name it.
    pub fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn error(&mut self, key: &str, message: &str) {
        self.failed = true;
        let key = self.key(key);
        self.errors.push(ConfigError { key, message: message.to_string() });
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The value of `key`, left in place.
    pub fn peek(&self, key: &str) -> Option<&toml::Value> {
        self.table.get(key)
    }

    pub fn take(&mut self, key: &str) -> Option<toml::Value> {
        self.table.remove(key)
    }

    fn wrong(&mut self, key: &str, expected: &str, found: &toml::Value) {
        self.error(key, &format!("expected {expected}, found {}", type_name(found)));
    }

    /// A string; `default` of `None` makes it required.
    pub fn string(&mut self, key: &str, default: Option<&str>) -> Option<String> {
        match self.take(key) {
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                self.wrong(key, "a string", &other);
                None
            }
            None => match default {
                Some(d) => Some(d.to_string()),
                None => {
                    self.error(key, "missing (expected a string)");
                    None
                }
            },
        }
    }

    pub fn opt_string(&mut self, key: &str) -> Option<String> {
        match self.take(key) {
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                self.wrong(key, "a string", &other);
                None
            }
            None => None,
        }
    }

    pub fn opt_pointer(&mut self, key: &str) -> Option<String> {
        let p = self.opt_string(key)?;
        if !is_pointer(&p) {
            self.error(key, &format!("expected a JSON pointer starting with '/', found {p:?}"));
            return None;
        }
        Some(p)
    }

    /// An integer within `min..=max`, `default` when absent.
    pub fn integer(&mut self, key: &str, default: u64, min: u64, max: u64) -> Option<u64> {
        match self.take(key) {
            Some(toml::Value::Integer(i)) if i >= min as i64 && i as u64 <= max => Some(i as u64),
            Some(toml::Value::Integer(i)) => {
                self.error(key, &format!("expected an integer in {min}..={max}, found {i}"));
                None
            }
            Some(other) => {
                self.wrong(key, "an integer", &other);
                None
            }
            None => Some(default),
        }
    }

    /// A number (integer or float) within `min..=max`, `default` when absent.
    pub fn number(&mut self, key: &str, default: f64, min: f64, max: f64) -> Option<f64> {
        let v = match self.take(key) {
            Some(toml::Value::Float(f)) => f,
            Some(toml::Value::Integer(i)) => i as f64,
            Some(other) => {
                self.wrong(key, "a number", &other);
                return None;
            }
            None => return Some(default),
        };
        if !(min..=max).contains(&v) {
            self.error(key, &format!("expected a number in {min}..={max}, found {v}"));
            return None;
        }
        Some(v)
    }

    /// An array of strings (empty when absent).
    pub fn strings(&mut self, key: &str) -> Option<Vec<String>> {
        match self.take(key) {
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(v) => out.push(v),
                        other => self.wrong(&format!("{key}[{i}]"), "a string", &other),
                    }
                }
                Some(out)
            }
            Some(other) => {
                self.wrong(key, "an array of strings", &other);
                None
            }
            None => Some(Vec::new()),
        }
    }

    pub fn boolean(&mut self, key: &str, default: bool) -> Option<bool> {
        match self.take(key) {
            Some(toml::Value::Boolean(b)) => Some(b),
            Some(other) => {
                self.wrong(key, "true or false", &other);
                None
            }
            None => Some(default),
        }
    }

    /// A table of `name = number`.
    pub fn table_of_numbers(&mut self, key: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        match self.take(key) {
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    match v {
                        toml::Value::Float(f) => {
                            out.insert(name, f);
                        }
                        toml::Value::Integer(i) => {
                            out.insert(name, i as f64);
                        }
                        other => self.wrong(&format!("{key}.{name}"), "a number", &other),
                    }
                }
            }
            Some(other) => self.wrong(key, "a table of name = number", &other),
            None => {}
        }
        out
    }

    /// A sub-table. When absent: an empty one if `optional`, else an error.
    pub fn section(&mut self, key: &str, optional: bool) -> Option<Section<'_>> {
        let path = self.key(key);
        match self.take(key) {
            Some(toml::Value::Table(t)) => Some(Section::new(t, path, self.errors)),
            Some(other) => {
                self.wrong(key, "a table", &other);
                None
            }
            None if optional => Some(Section::new(toml::Table::new(), path, self.errors)),
            None => {
                self.error(key, "missing (expected a table)");
                None
            }
        }
    }

    /// A child section with an explicit path (array elements).
    pub fn child(&mut self, table: toml::Table, path: String) -> Section<'_> {
        Section::new(table, path, self.errors)
    }

    pub fn array_of_tables(&mut self, key: &str) -> Option<Vec<toml::Table>> {
        match self.take(key) {
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::Table(t) => out.push(t),
                        other => self.wrong(&format!("{key}[{i}]"), "a table", &other),
                    }
                }
                Some(out)
            }
            Some(other) => {
                self.wrong(key, "an array of tables ([[pipeline]])", &other);
                None
            }
            None => {
                self.error(key, "missing (expected at least one [[pipeline]])");
                None
            }
        }
    }

    /// A table of `name = "/json/pointer"`.
    pub fn table_of_pointers(&mut self, key: &str) -> Option<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match self.take(key) {
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let k = format!("{key}.{name}");
                    match v {
                        toml::Value::String(p) if is_pointer(&p) => {
                            out.insert(name, p);
                        }
                        toml::Value::String(p) => {
                            self.error(&k, &format!("expected a JSON pointer starting with '/', found {p:?}"))
                        }
                        other => self.wrong(&k, "a JSON pointer string", &other),
                    }
                }
            }
            Some(other) => self.wrong(key, "a table of input name = \"/json/pointer\"", &other),
            None => {}
        }
        Some(out)
    }

    /// A table of input name = non-empty string (Sparkplug metric names).
    /// A table of non-empty strings, each `what` (e.g. "a metric name").
    pub fn table_of_strings(&mut self, key: &str, what: &str) -> Option<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        match self.take(key) {
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    match v {
                        toml::Value::String(m) if !m.is_empty() => {
                            out.insert(name, m);
                        }
                        other => self.wrong(&format!("{key}.{name}"), what, &other),
                    }
                }
            }
            Some(other) => self.wrong(key, "a table of input name = \"metric name\"", &other),
            None => {}
        }
        Some(out)
    }

    /// Reports the keys nobody read as unknown; returns whether this section had no errors.
    pub fn finish(mut self) -> bool {
        let left: Vec<String> = self.table.keys().cloned().collect();
        for key in left {
            self.error(&key, "unknown key");
        }
        !self.failed
    }
}

fn is_pointer(p: &str) -> bool {
    p.starts_with('/')
}

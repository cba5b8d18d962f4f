//! The CSVs people bring: the validation set for `bundle create` and fresh data for
//! `lathe train`. Spreadsheets, historians and pandas each write CSV a little differently, so a
//! file is read as it comes:
//! - UTF-8 (a byte-order mark is ignored), or UTF-16 with its byte-order mark: what Excel's
//!   "Unicode text" export writes ([`read_file`]);
//! - lines may end in `\r\n`, blank lines are skipped;
//! - cells are separated by `,`, `;` or a tab: whichever the header line holds most of;
//! - a cell may be quoted (`"37"`, `"a, b"`, `""` for a quote inside), as RFC 4180 says;
//! - where cells are separated by `;` or a tab, a decimal comma (`0,25`) reads as a point:
//!   the European spreadsheet export.
//!
//! A quoted cell that runs past the end of its line is refused, naming the line: no numeric
//! table needs one, and reading it line by line keeps every error's line number true.
//! Inside a bundle `validation.csv` is always comma-separated ([`comma_separated`]), so
//! anything that reads a bundle reads it as plain CSV.

use std::borrow::Cow;
use std::path::PathBuf;

/// Why a CSV could not be read. Each message names the line (or the file) where it applies.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Neither UTF-8 nor UTF-16 with a byte-order mark.
    #[error("{}: {message}", path.display())]
    Encoding { path: PathBuf, message: String },
    /// Not a table: empty, a row of the wrong width, a quoted cell left open.
    #[error("{0}")]
    Shape(String),
    #[error("no column {name:?} in the CSV (its columns: {columns})")]
    NoColumn { name: String, columns: String },
    /// A cell of a column that must hold numbers (or class names) holds something else.
    #[error("line {line}: column {column:?} holds {text:?}, {expected}")]
    BadCell { line: usize, column: String, text: String, expected: String },
}

/// The columns of `header`, at most a dozen, for messages.
fn shown(header: &[impl AsRef<str>]) -> String {
    let mut shown: Vec<&str> = header.iter().take(12).map(AsRef::as_ref).collect();
    if header.len() > shown.len() {
        shown.push("…");
    }
    shown.join(", ")
}

/// A CSV of numbers, with a header. Cells that are not numbers (an id or a timestamp column)
/// are kept as NaN and remembered, so they only matter if a used column holds them.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<f64>>,
    /// Per column, the first cell that is not a number: (line, text).
    pub not_numeric: Vec<Option<(usize, String)>>,
}

impl Table {
    /// # Errors
    /// A column that does not exist or holds a cell that is not a number.
    pub fn numeric_column(&self, name: &str) -> Result<usize, CsvError> {
        let c = self.column(name)?;
        match &self.not_numeric[c] {
            Some((line, text)) => Err(CsvError::BadCell {
                line: *line,
                column: name.to_string(),
                text: text.clone(),
                expected: "not a number (name the feature columns with --features)".into(),
            }),
            None => Ok(c),
        }
    }

    /// # Errors
    /// No column of that name; the message lists the columns there are.
    pub fn column(&self, name: &str) -> Result<usize, CsvError> {
        let missing = || CsvError::NoColumn { name: name.to_string(), columns: shown(&self.header) };
        self.header.iter().position(|h| h == name).ok_or_else(missing)
    }
}

/// Reads a CSV file as text: UTF-8, or UTF-16 where it starts with a byte-order mark.
///
/// # Errors
/// The file cannot be read, or is in another encoding: the message names the line.
pub fn read_file(path: &std::path::Path) -> Result<String, CsvError> {
    let bytes = std::fs::read(path).map_err(|source| CsvError::Read { path: path.to_path_buf(), source })?;
    decode(bytes).map_err(|message| CsvError::Encoding { path: path.to_path_buf(), message })
}

fn decode(bytes: Vec<u8>) -> Result<String, String> {
    let utf16 = |pair: fn([u8; 2]) -> u16| {
        let units: Vec<u16> = bytes[2..].chunks_exact(2).map(|c| pair([c[0], c[1]])).collect();
        String::from_utf16(&units).map_err(|_| "not valid UTF-16 after its byte-order mark".to_string())
    };
    match bytes.get(..2) {
        Some([0xff, 0xfe]) => utf16(u16::from_le_bytes),
        Some([0xfe, 0xff]) => utf16(u16::from_be_bytes),
        _ => String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            format!("line {line} is not UTF-8 (a spreadsheet's \"CSV UTF-8\" export is)")
        }),
    }
}

/// Parses a CSV with a header line, in any of the forms the module comment lists.
///
/// # Errors
/// An empty file, a row with the wrong number of cells or a quoted cell left open, naming the
/// line.
pub fn parse_csv(text: &str) -> Result<Table, CsvError> {
    let mut lines = lines(text);
    let (_, head) = lines.next().ok_or_else(|| CsvError::Shape("the CSV is empty".into()))?;
    let delimiter = delimiter(head);
    let header: Vec<String> = split(head, delimiter, 1)?.into_iter().map(Cow::into_owned).collect();
    let mut not_numeric = vec![None; header.len()];
    let mut rows = Vec::new();
    for (line, text) in lines {
        let cells = split(text, delimiter, line)?;
        if cells.len() != header.len() {
            let (n, h) = (cells.len(), header.len());
            return Err(CsvError::Shape(format!("line {line}: {n} cells, the header has {h}")));
        }
        let row = cells
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                number(cell, delimiter).unwrap_or_else(|| {
                    not_numeric[c].get_or_insert_with(|| (line, cell.to_string()));
                    f64::NAN
                })
            })
            .collect();
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(CsvError::Shape("the CSV has a header but no rows".into()));
    }
    Ok(Table { header, rows, not_numeric })
}

/// The same table as plain comma-separated text with decimal points: what a bundle keeps as
/// `validation.csv`. A file already comma-separated is kept byte for byte.
///
/// # Errors
/// As [`parse_csv`].
pub fn comma_separated(text: &str) -> Result<Cow<'_, str>, CsvError> {
    let Some((_, head)) = lines(text).next() else { return Ok(Cow::Borrowed(text)) };
    let delimiter = delimiter(head);
    if delimiter == ',' {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    for (line, text) in lines(text) {
        let cells = split(text, delimiter, line)?;
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_cell(&mut out, cell, delimiter);
        }
        out.push('\n');
    }
    Ok(Cow::Owned(out))
}

/// One cell as comma-separated CSV writes it: a number with a decimal point, text quoted
/// where it holds a comma, a quote or outer spaces.
pub fn push_cell(out: &mut String, cell: &str, delimiter: char) {
    match number(cell, delimiter) {
        Some(_) => out.push_str(&cell.replace(',', ".")),
        None if cell.contains([',', '"']) || cell.trim() != cell => {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        }
        None => out.push_str(cell),
    }
}

/// A comma-separated CSV (as [`comma_separated`] gives it) with each cell of column `name`
/// that names one of `classes` replaced by that class's index, for a classifier trained on
/// class names (`normal`, `fault`): the model's outputs are in the order of `classes`. A cell
/// that is already a number stays as it is.
///
/// # Errors
/// No such column, or a cell that is neither a number nor one of the classes.
pub fn class_indices(text: &str, name: &str, classes: &[String]) -> Result<String, CsvError> {
    let mut out = String::with_capacity(text.len());
    let mut column = None;
    for (line, row) in lines(text) {
        let cells = split(row, ',', line)?;
        let target = match column {
            Some(c) => c,
            None => {
                let missing = || CsvError::NoColumn { name: name.to_string(), columns: shown(&cells) };
                let c = cells.iter().position(|h| h == name).ok_or_else(missing)?;
                column = Some(c);
                usize::MAX // the header: every cell as it is
            }
        };
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if i == target && number(cell, ',').is_none() {
                let index = classes.iter().position(|k| k == cell).ok_or_else(|| CsvError::BadCell {
                    line,
                    column: name.to_string(),
                    text: cell.to_string(),
                    expected: format!("which is not one of the model's classes ({})", classes.join(", ")),
                })?;
                out.push_str(&index.to_string());
            } else {
                push_cell(&mut out, cell, ',');
            }
        }
        out.push('\n');
    }
    Ok(out)
}

/// Column `name`'s cells as text, one per row (the rows [`parse_csv`] reads), of a
/// comma-separated CSV (as [`comma_separated`] gives it): an id column such as the device.
///
/// # Errors
/// No such column, or a row [`parse_csv`] would refuse.
pub fn text_column(text: &str, name: &str) -> Result<Vec<String>, CsvError> {
    let mut rows = lines(text);
    let (_, head) = rows.next().ok_or_else(|| CsvError::Shape("the CSV is empty".into()))?;
    let header = split(head, ',', 1)?;
    let missing = || CsvError::NoColumn { name: name.to_string(), columns: shown(&header) };
    let c = header.iter().position(|h| h == name).ok_or_else(missing)?;
    rows.map(|(line, row)| {
        let cells = split(row, ',', line)?;
        let no_cell = || CsvError::Shape(format!("line {line}: no cell for column {name:?}"));
        cells.get(c).map(|cell| cell.to_string()).ok_or_else(no_cell)
    })
    .collect()
}

/// The non-blank lines after any byte-order mark, with their 1-based line numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l))
}

/// The separator the header line holds most of (outside quotes): `,`, `;` or a tab. A header
/// of one column has none, and is read as comma-separated.
fn delimiter(header: &str) -> char {
    let mut counts = [(',', 0usize), (';', 0), ('\t', 0)];
    let mut quoted = false;
    for ch in header.chars() {
        if ch == '"' {
            quoted = !quoted;
        } else if !quoted {
            if let Some(c) = counts.iter_mut().find(|(d, _)| *d == ch) {
                c.1 += 1;
            }
        }
    }
    // The first of the most frequent: a comma wins a tie.
    counts.iter().fold((',', 0), |best, &c| if c.1 > best.1 { c } else { best }).0
}

/// One line's cells: unquoted cells trimmed, quoted ones as written between their quotes.
fn split(line: &str, delimiter: char, number: usize) -> Result<Vec<Cow<'_, str>>, CsvError> {
    let mut cells = Vec::new();
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start_matches(|c: char| (c == ' ' || c == '\t') && c != delimiter);
        if let Some(quoted) = trimmed.strip_prefix('"') {
            let (cell, after) = quoted_cell(quoted).ok_or_else(|| {
                CsvError::Shape(format!(
                    "line {number}: a quoted cell is not closed on its line (a cell that spans lines is not read)"
                ))
            })?;
            cells.push(cell);
            // Whatever follows the closing quote up to the separator is dropped if blank.
            match after.find(delimiter) {
                Some(i) if after[..i].trim().is_empty() => rest = &after[i + delimiter.len_utf8()..],
                None if after.trim().is_empty() => return Ok(cells),
                _ => return Err(CsvError::Shape(format!("line {number}: text after a quoted cell's closing quote"))),
            }
        } else {
            match rest.find(delimiter) {
                Some(i) => {
                    cells.push(Cow::Borrowed(rest[..i].trim()));
                    rest = &rest[i + delimiter.len_utf8()..];
                }
                None => {
                    cells.push(Cow::Borrowed(rest.trim()));
                    return Ok(cells);
                }
            }
        }
    }
}

/// A quoted cell's text (after its opening quote) and what follows its closing quote; `None`
/// if the line ends first. `""` inside stands for one quote.
fn quoted_cell(s: &str) -> Option<(Cow<'_, str>, &str)> {
    let mut owned: Option<String> = None;
    let mut start = 0;
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < bytes.len() {
        if bytes[i] == b'"' {
            if bytes.get(i + 1) == Some(&b'"') {
                owned.get_or_insert_with(String::new).push_str(&s[start..=i]);
                i += 2;
                start = i;
                continue;
            }
            let cell = match owned {
                Some(mut o) => {
                    o.push_str(&s[start..i]);
                    Cow::Owned(o)
                }
                None => Cow::Borrowed(&s[..i]),
            };
            return Some((cell, &s[i + 1..]));
        }
        i += 1;
    }
    None
}

/// A cell as a number; where cells are not comma-separated, `0,25` reads as 0.25.
fn number(cell: &str, delimiter: char) -> Option<f64> {
    let cell = cell.trim();
    cell.parse::<f64>().ok().or_else(|| {
        let decimal_comma = delimiter != ',' && cell.matches(',').count() == 1 && !cell.contains('.');
        decimal_comma.then(|| cell.replace(',', ".").parse::<f64>().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        match parse_csv(text) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn error(text: &str) -> String {
        match parse_csv(text) {
            Ok(_) => panic!("{text:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    /// The same numbers, however the file was exported.
    #[test]
    fn spreadsheet_historian_and_pandas_exports_read_the_same() {
        let plain = table("f1,f2,target\n1.5,-2,0\n3,4e2,1\n");
        for text in [
            "\u{feff}f1,f2,target\r\n1.5,-2,0\r\n\r\n3,4e2,1\r\n",
            "\"f1\",\"f2\",\"target\"\n\"1.5\",\"-2\",\"0\"\n\"3\",\"4e2\",\"1\"\n",
            "f1;f2;target\n1,5;-2;0\n3;4e2;1\n",
            "f1\tf2\ttarget\n1,5\t-2\t0\n3\t 4e2 \t1\n",
            "\"f1\" ; f2 ; target\n\"1,5\" ; -2 ; 0\n3;4e2;1\n",
        ] {
            let t = table(text);
            assert_eq!(t.header, plain.header, "{text:?}");
            assert_eq!(t.rows, plain.rows, "{text:?}");
            assert!(t.not_numeric.iter().all(Option::is_none), "{text:?}");
        }
    }

    #[test]
    fn a_quoted_cell_may_hold_the_separator_and_quotes() {
        let t = table("id,x\n\"pump 7, \"\"north\"\"\",2\n");
        assert!(t.rows[0][0].is_nan());
        assert_eq!(t.not_numeric[0], Some((2, "pump 7, \"north\"".to_string())));
        assert_eq!(t.rows[0][1], 2.0);
    }

    /// A decimal comma is a comma-separated file's separator, never a decimal point there.
    #[test]
    fn a_comma_in_a_comma_separated_file_splits_cells() {
        assert_eq!(error("a,b\n1,5,2\n"), "line 2: 3 cells, the header has 2");
        let t = table("a;b\n1.234,5;2\n");
        assert_eq!(t.not_numeric[0], Some((2, "1.234,5".to_string())), "a thousands separator is not guessed");
    }

    #[test]
    fn broken_lines_are_refused_with_their_number() {
        assert_eq!(
            error("a,b\n1,2\n\"3,4\n5\",6\n"),
            "line 3: a quoted cell is not closed on its line (a cell that spans lines is not read)"
        );
        assert_eq!(error("a,b\n1,\"2\"x\n"), "line 2: text after a quoted cell's closing quote");
        assert_eq!(error("\n\n"), "the CSV is empty");
        assert_eq!(error("a,b\n"), "the CSV has a header but no rows");
    }

    #[test]
    fn a_missing_column_names_the_columns_there_are() {
        let t = table("f1;f2;anomaly\n1;2;0\n");
        let missing = t.column("f3").map_err(|e| e.to_string());
        assert_eq!(missing, Err("no column \"f3\" in the CSV (its columns: f1, f2, anomaly)".to_string()));
    }

    #[test]
    fn utf16_exports_read_and_other_encodings_name_their_line() {
        let text = "f1\tf2\n1,5\t2\n";
        let le: Vec<u8> = [0xff, 0xfe].into_iter().chain(text.encode_utf16().flat_map(u16::to_le_bytes)).collect();
        let be: Vec<u8> = [0xfe, 0xff].into_iter().chain(text.encode_utf16().flat_map(u16::to_be_bytes)).collect();
        assert_eq!(decode(le).as_deref(), Ok(text));
        assert_eq!(decode(be).as_deref(), Ok(text));
        // "Temp °C" in Windows-1252 on the second line.
        let latin1 = b"a,b\nTemp \xb0C,2\n".to_vec();
        assert_eq!(decode(latin1), Err("line 2 is not UTF-8 (a spreadsheet's \"CSV UTF-8\" export is)".to_string()));
    }

    /// What a bundle keeps: plain CSV that any reader (and this one) reads as the original.
    #[test]
    fn a_bundle_keeps_its_validation_set_comma_separated() {
        let plain = "f1,f2,target\n1.5,-2,0\n";
        assert!(matches!(comma_separated(plain), Ok(Cow::Borrowed(t)) if t == plain));
        let european = "when;f1;target\n2026-01-05 10:00;1,5;0\n\"line 3; north\";-2;1\n";
        let converted = match comma_separated(european) {
            Ok(c) => c.into_owned(),
            Err(e) => panic!("{e}"),
        };
        // "line 3; north" needs no quotes once commas separate the cells.
        assert_eq!(converted, "when,f1,target\n2026-01-05 10:00,1.5,0\nline 3; north,-2,1\n");
        let (a, b) = (table(european), table(&converted));
        assert_eq!(a.header, b.header);
        assert_eq!(format!("{:?}", a.rows), format!("{:?}", b.rows));
        assert_eq!(a.not_numeric, b.not_numeric);
    }

    #[test]
    fn class_names_become_their_indices_and_an_unknown_name_is_named() {
        let classes = ["fault".to_string(), "ok".to_string()];
        let text = "f1,\"where, exactly\",state\n1.5,\"line 3, north\",ok\n2,south,fault\n3,west,1\n";
        let converted = class_indices(text, "state", &classes).unwrap();
        assert_eq!(converted, "f1,\"where, exactly\",state\n1.5,\"line 3, north\",1\n2,south,0\n3,west,1\n");
        let err = class_indices("f1,state\n1,ok\n2,broken\n", "state", &classes).unwrap_err();
        assert!(matches!(&err, CsvError::BadCell { line: 3, text, .. } if text == "broken"), "{err}");
        assert!(err.to_string().contains("fault, ok"), "{err}");
        let err = class_indices("f1,state\n1,ok\n", "label", &classes).unwrap_err();
        assert!(
            matches!(&err, CsvError::NoColumn { name, columns } if name == "label" && columns == "f1, state"),
            "{err}"
        );
    }
}

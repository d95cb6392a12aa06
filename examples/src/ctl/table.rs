//! Plain-text tables for `keelson-ctl`: a header row, left-aligned columns two spaces
//! apart, no colour (output is often piped), `-` for an empty cell.

/// A table being built.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names (printed upper-case).
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|h| h.to_uppercase()).collect(), rows: Vec::new() }
    }

    /// Adds a row; missing cells print as `-`.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let cell = |row: &[String], i: usize| row.get(i).filter(|c| !c.is_empty()).map_or("-", String::as_str).to_owned();
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, w) in widths.iter_mut().enumerate() {
                *w = (*w).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                line.push_str(&text);
                if i + 1 < columns {
                    line.push_str(&" ".repeat(width - text.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_empty_cells_show_a_dash() {
        let mut t = Table::new(&["id", "status"]);
        t.row(vec!["n1".into(), "ready".into()]);
        t.row(vec!["node-two".into(), String::new()]);
        assert_eq!(t.render(), "ID        STATUS\nn1        ready\nnode-two  -\n");
    }
}

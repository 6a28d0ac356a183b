//! An incremental RFC 4180 CSV reader for export files: fed byte chunks as they arrive, it
//! yields complete records and keeps only the record in progress, so a file of any size is read
//! in bounded memory.
//!
//! Accepted: fields separated by `,`; records ended by `\n`, `\r\n` or a lone `\r`; quoted
//! fields (`"a,b"`, `"say ""hi"""`, line breaks inside quotes); a last record without a line
//! end; a UTF-8 byte-order mark at the start. Refused ([`CsvError`]): a quote inside an
//! unquoted field, text after a closing quote, an unterminated quote at the end, invalid UTF-8,
//! a record longer than [`MAX_RECORD_BYTES`]. Empty lines are skipped.

/// Longest record accepted (bytes): a guard against a file that is not CSV.
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// Why a file is not valid CSV.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CSV record {record}: {message}")]
pub struct CsvError {
    /// 1-based number of the record (the header is record 1).
    pub record: u64,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a field.
    FieldStart,
    /// Inside an unquoted field.
    Unquoted,
    /// Inside a quoted field.
    Quoted,
    /// A quote inside a quoted field: either the closing one or the first of a doubled pair.
    QuoteInQuoted,
    /// Just after a `\r` that ended a record: a following `\n` belongs to it.
    AfterCr,
}

/// The incremental reader (see the module docs).
#[derive(Debug)]
pub struct CsvReader {
    state: State,
    field: Vec<u8>,
    record: Vec<String>,
    record_bytes: usize,
    records: u64,
}

impl Default for CsvReader {
    fn default() -> Self {
        Self::new()
    }
}

impl CsvReader {
    /// A reader at the start of a file.
    pub fn new() -> Self {
        Self {
            state: State::FieldStart,
            field: Vec::new(),
            record: Vec::new(),
            record_bytes: 0,
            records: 0,
        }
    }

    /// Records completed so far.
    pub fn records_read(&self) -> u64 {
        self.records
    }

    fn error(&self, message: impl Into<String>) -> CsvError {
        CsvError {
            record: self.records + 1,
            message: message.into(),
        }
    }

    fn end_field(&mut self) -> Result<(), CsvError> {
        let bytes = std::mem::take(&mut self.field);
        let mut text = String::from_utf8(bytes).map_err(|_| self.error("invalid UTF-8"))?;
        if self.records == 0 && self.record.is_empty() && text.starts_with('\u{feff}') {
            // The byte-order mark some tools put at the start of a file.
            text.remove(0);
        }
        self.record.push(text);
        Ok(())
    }

    fn end_record(&mut self, out: &mut Vec<Vec<String>>) -> Result<(), CsvError> {
        self.end_field()?;
        let record = std::mem::take(&mut self.record);
        self.record_bytes = 0;
        // An empty line is one empty field: skip it.
        if !(record.len() == 1 && record[0].is_empty()) {
            self.records += 1;
            out.push(record);
        }
        Ok(())
    }

    /// Feeds the next bytes of the file; returns the records they completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<String>>, CsvError> {
        let mut out = Vec::new();
        for &byte in chunk {
            self.record_bytes += 1;
            if self.record_bytes > MAX_RECORD_BYTES {
                return Err(self.error(format!(
                    "longer than {MAX_RECORD_BYTES} bytes: not a CSV export?"
                )));
            }
            match (self.state, byte) {
                (State::AfterCr, b'\n') => {
                    self.state = State::FieldStart;
                    self.record_bytes = 0;
                }
                (State::AfterCr, _) => {
                    self.state = State::FieldStart;
                    self.record_bytes = 0;
                    self.byte_at_field_start(byte, &mut out)?;
                }
                (State::FieldStart, _) => self.byte_at_field_start(byte, &mut out)?,
                (State::Unquoted, b',') => {
                    self.end_field()?;
                    self.state = State::FieldStart;
                }
                (State::Unquoted, b'\n') => {
                    self.end_record(&mut out)?;
                    self.state = State::FieldStart;
                }
                (State::Unquoted, b'\r') => {
                    self.end_record(&mut out)?;
                    self.state = State::AfterCr;
                }
                (State::Unquoted, b'"') => {
                    return Err(self.error("a quote inside an unquoted field"));
                }
                (State::Unquoted, _) | (State::Quoted, _) if byte != b'"' => self.field.push(byte),
                (State::Quoted, _) => self.state = State::QuoteInQuoted,
                (State::QuoteInQuoted, b'"') => {
                    self.field.push(b'"');
                    self.state = State::Quoted;
                }
                (State::QuoteInQuoted, b',') => {
                    self.end_field()?;
                    self.state = State::FieldStart;
                }
                (State::QuoteInQuoted, b'\n') => {
                    self.end_record(&mut out)?;
                    self.state = State::FieldStart;
                }
                (State::QuoteInQuoted, b'\r') => {
                    self.end_record(&mut out)?;
                    self.state = State::AfterCr;
                }
                (State::QuoteInQuoted, _) => {
                    return Err(self.error("text after a closing quote"));
                }
                (State::Unquoted, _) => self.field.push(byte),
            }
        }
        Ok(out)
    }

    fn byte_at_field_start(
        &mut self,
        byte: u8,
        out: &mut Vec<Vec<String>>,
    ) -> Result<(), CsvError> {
        match byte {
            b'"' => self.state = State::Quoted,
            b',' => self.end_field()?,
            b'\n' => self.end_record(out)?,
            b'\r' => {
                self.end_record(out)?;
                self.state = State::AfterCr;
            }
            _ => {
                self.field.push(byte);
                self.state = State::Unquoted;
            }
        }
        Ok(())
    }

    /// Ends the file: the last record when it had no line end.
    pub fn finish(mut self) -> Result<Option<Vec<String>>, CsvError> {
        match self.state {
            State::Quoted => Err(self.error("unterminated quoted field at the end of the file")),
            State::AfterCr => Ok(None),
            State::FieldStart if self.record.is_empty() => Ok(None),
            _ => {
                let mut out = Vec::new();
                self.end_record(&mut out)?;
                Ok(out.pop())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read_in_chunks(input: &[u8], size: usize) -> Result<Vec<Vec<String>>, CsvError> {
        let mut reader = CsvReader::new();
        let mut all = Vec::new();
        for chunk in input.chunks(size.max(1)) {
            all.extend(reader.push(chunk)?);
        }
        all.extend(reader.finish()?);
        Ok(all)
    }

    fn rec(fields: &[&str]) -> Vec<String> {
        fields.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn reads_quotes_line_ends_and_utf8_split_anywhere() {
        let input = "\u{feff}id,email,note\r\n1,a@x.io,\"Paris, FR\"\n2,,\"say \"\"hi\"\"\r\nline 2\"\r3,é€,\n\n4,\"\",last";
        let want = vec![
            rec(&["id", "email", "note"]),
            rec(&["1", "a@x.io", "Paris, FR"]),
            rec(&["2", "", "say \"hi\"\r\nline 2"]),
            rec(&["3", "é€", ""]),
            rec(&["4", "", "last"]),
        ];
        for size in [1, 2, 3, 5, 7, 64, 4096] {
            assert_eq!(
                read_in_chunks(input.as_bytes(), size).unwrap(),
                want,
                "{size}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_csv() {
        for (bad, record) in [
            ("a,b\nc\"d,e\n", 2),
            ("a,\"b\"x\n", 1),
            ("a,\"unterminated\n", 1),
        ] {
            let err = read_in_chunks(bad.as_bytes(), 3).unwrap_err();
            assert_eq!(err.record, record, "{bad}: {err}");
        }
        let err = read_in_chunks(b"a,\xff\xfe\n", 2).unwrap_err();
        assert!(err.message.contains("UTF-8"), "{err}");
        let mut reader = CsvReader::new();
        let long = vec![b'x'; MAX_RECORD_BYTES + 1];
        assert!(reader.push(&long).is_err());
    }

    #[test]
    fn trailing_line_end_gives_no_extra_record() {
        assert_eq!(read_in_chunks(b"a\r\n", 1).unwrap(), vec![rec(&["a"])]);
        assert_eq!(read_in_chunks(b"a\r", 1).unwrap(), vec![rec(&["a"])]);
        assert_eq!(read_in_chunks(b"", 1).unwrap(), Vec::<Vec<String>>::new());
        assert_eq!(read_in_chunks(b"a,", 1).unwrap(), vec![rec(&["a", ""])]);
    }
}

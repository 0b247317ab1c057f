//! A streamed body cut into lines as it arrives, for the readers of SSE and NDJSON streams
//! (the token meter and the dialect translator).

/// The lines of a body that arrives in pieces. Whole lines are handed out where they lie in each
/// piece (one pass, nothing shifted per line); only a line split across pieces is put together.
/// A partial line longer than `MAX` bytes is dropped: whoever sends the stream controls its
/// length.
#[derive(Debug, Default)]
pub struct Lines<const MAX: usize> {
    partial: Vec<u8>,
}

impl<const MAX: usize> Lines<MAX> {
    /// Hands each line `chunk` completes, with its `\n`, to `line`, and keeps the unfinished
    /// end for the next piece.
    pub fn feed(&mut self, chunk: &[u8], mut line: impl FnMut(&[u8])) {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                self.partial.extend_from_slice(&rest[..=nl]);
                line(&self.partial);
                self.partial.clear();
                rest = &rest[nl + 1..];
            }
        }
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            line(&rest[..=nl]);
            rest = &rest[nl + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX {
            self.partial = Vec::new();
        }
    }

    /// The unfinished last line, once the body has ended.
    pub fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }

    /// Bytes held for an unfinished line.
    pub fn held(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(body: &[u8], every: usize) -> Vec<Vec<u8>> {
        let mut lines = Lines::<64>::default();
        let mut out = Vec::new();
        for piece in body.chunks(every) {
            lines.feed(piece, |l| out.push(l.to_vec()));
        }
        out.push(lines.rest());
        out
    }

    #[test]
    fn lines_are_the_same_however_the_body_is_cut() {
        let body = b"a\n\nbc\ndef\nlast without newline";
        let whole = cut(body, body.len());
        assert_eq!(
            whole,
            [
                &b"a\n"[..],
                b"\n",
                b"bc\n",
                b"def\n",
                b"last without newline"
            ]
        );
        for every in 1..body.len() {
            assert_eq!(cut(body, every), whole, "cut every {every} bytes");
        }
    }

    #[test]
    fn a_partial_line_beyond_the_limit_is_dropped_and_lines_resume() {
        let mut lines = Lines::<64>::default();
        let mut seen = Vec::new();
        for _ in 0..10 {
            lines.feed(&[b'x'; 30], |l| seen.push(l.to_vec()));
            assert!(lines.held() <= 64, "{}", lines.held());
        }
        lines.feed(b"\nok\n", |l| seen.push(l.to_vec()));
        assert_eq!(seen.last().map(Vec::as_slice), Some(&b"ok\n"[..]));
        assert!(seen.iter().all(|l| l.len() <= 64 + 1), "{seen:?}");
    }
}

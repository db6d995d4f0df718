//! The full-text half of the recall index: tantivy (BM25), with the filter fields
//! (space, kind, tags, access tokens, writer tokens, validity, positions) indexed
//! beside the text, so that visibility, trust and time filters run inside the
//! index, before scoring: a reader never gets a score, a rank or a count for a
//! memory it may not see.
//!
//! Documents are keyed by the memory's creation position (`seq`). The memory-log
//! watermark this index reflects travels in tantivy's commit payload, so the
//! index content and its watermark are committed atomically.

use concord_core::memory::{access_tokens, writer_tokens, Visibility};
use concord_store::StoredMemory;
use std::ops::Bound;
use std::path::Path;
use tantivy::collector::{Collector, SegmentCollector, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, ConstScoreQuery, Occur, Query, RangeQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, TextFieldIndexing, TextOptions, FAST,
    INDEXED, STRING,
};
use tantivy::{
    DocId, Index, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader, TantivyDocument,
    Term,
};

/// Open-ended times and positions are stored as this, so "still open" is a term.
pub const OPEN: i64 = i64::MAX;
/// The writer's indexing memory: tantivy's minimum. Passes are small (what was
/// written since the last one) and each commit starts a new segment whose arena
/// is sized by this budget, so a larger one only costs zeroed pages per commit.
const WRITER_BYTES: usize = 15_000_000;

#[derive(Clone, Copy)]
pub struct Fields {
    pub text: Field,
    pub seq: Field,
    pub space: Field,
    pub kind: Field,
    pub tags: Field,
    pub acl: Field,
    pub writer: Field,
    pub created_at: Field,
    pub valid_at: Field,
    pub invalid_at: Field,
    pub closed_seq: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    // Frequencies, no positions: BM25 needs no more, and the index stays small.
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("default")
                .set_index_option(IndexRecordOption::WithFreqs),
        ),
    );
    let num = || NumericOptions::from(INDEXED | FAST);
    let f = Fields {
        text,
        seq: b.add_i64_field("seq", num()),
        space: b.add_text_field("space", STRING),
        kind: b.add_text_field("kind", STRING),
        tags: b.add_text_field("tags", STRING),
        acl: b.add_text_field("acl", STRING),
        writer: b.add_text_field("writer", STRING),
        created_at: b.add_i64_field("created_at", num()),
        valid_at: b.add_i64_field("valid_at", num()),
        invalid_at: b.add_i64_field("invalid_at", num()),
        closed_seq: b.add_i64_field("closed_seq", num()),
    };
    (b.build(), f)
}

pub struct TextIndex {
    pub fields: Fields,
    index: Index,
    writer: IndexWriter,
    reader: IndexReader,
    watermark: i64,
}

fn terr(e: tantivy::TantivyError) -> concord_core::Error {
    concord_core::Error::internal(format!("recall index: {e}"))
}

impl TextIndex {
    /// Opens the index in `dir` (creating it; recreating it if it cannot be read:
    /// it is derived, the store rebuilds it), or in memory without a dir.
    pub fn open(dir: Option<&Path>) -> concord_core::Result<TextIndex> {
        let (schema, fields) = schema();
        let index = match dir {
            None => Index::create_in_ram(schema),
            Some(d) => match Self::open_dir(d, &schema) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(dir = %d.display(), "recall index unreadable ({e}); rebuilding it from the memory log");
                    let _ = std::fs::remove_dir_all(d);
                    Self::open_dir(d, &schema).map_err(terr)?
                }
            },
        };
        let watermark = index
            .load_metas()
            .map_err(terr)?
            .payload
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(0);
        let writer = index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(terr)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(terr)?;
        Ok(TextIndex {
            fields,
            index,
            writer,
            reader,
            watermark,
        })
    }

    fn open_dir(d: &Path, schema: &Schema) -> tantivy::Result<Index> {
        std::fs::create_dir_all(d)?;
        let dir = tantivy::directory::MmapDirectory::open(d)
            .map_err(|e| tantivy::TantivyError::SystemError(e.to_string()))?;
        let index = Index::open_or_create(dir, schema.clone())?;
        // A stale schema (an older build) would fail every query: rebuild instead.
        if index.schema() != *schema {
            return Err(tantivy::TantivyError::SchemaError("schema changed".into()));
        }
        Ok(index)
    }

    /// The memory-log position this index reflects, as last committed.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Replaces the memory's document (or removes it, once purged).
    pub fn stage(&mut self, m: &StoredMemory) -> concord_core::Result<()> {
        let f = self.fields;
        let mem = &m.memory;
        self.writer
            .delete_term(Term::from_field_i64(f.seq, mem.seq));
        if mem.purged {
            return Ok(());
        }
        let mut doc = TantivyDocument::default();
        doc.add_text(f.text, &mem.text);
        doc.add_i64(f.seq, mem.seq);
        doc.add_text(f.space, &mem.space);
        doc.add_text(f.kind, &mem.kind);
        for t in &mem.tags {
            doc.add_text(f.tags, t);
        }
        let vis = Visibility::parse("visibility", &mem.visibility).unwrap_or(Visibility::Private);
        for t in access_tokens(&vis, &m.owner) {
            doc.add_text(f.acl, t);
        }
        for t in writer_tokens(
            mem.provenance.entity.as_deref(),
            mem.provenance.instance.as_deref(),
        ) {
            doc.add_text(f.writer, t);
        }
        doc.add_i64(f.created_at, mem.created_at.millis());
        doc.add_i64(f.valid_at, mem.valid_at.millis());
        doc.add_i64(
            f.invalid_at,
            mem.invalid_at.map(|t| t.millis()).unwrap_or(OPEN),
        );
        doc.add_i64(f.closed_seq, m.closed_seq.unwrap_or(OPEN));
        self.writer.add_document(doc).map_err(terr)?;
        Ok(())
    }

    /// Commits what was staged with the new watermark and makes it searchable.
    pub fn commit(&mut self, watermark: i64) -> concord_core::Result<()> {
        let mut prepared = self.writer.prepare_commit().map_err(terr)?;
        prepared.set_payload(&watermark.to_string());
        prepared.commit().map_err(terr)?;
        self.reader.reload().map_err(terr)?;
        self.watermark = watermark;
        Ok(())
    }

    /// Empties the index (its watermark back to 0).
    pub fn clear(&mut self) -> concord_core::Result<()> {
        self.writer.delete_all_documents().map_err(terr)?;
        self.commit(0)
    }

    pub fn reader(&self) -> IndexReader {
        self.reader.clone()
    }

    pub fn index(&self) -> &Index {
        &self.index
    }
}

// ---------- queries ----------

pub fn term(field: Field, s: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(
        Term::from_field_text(field, s),
        IndexRecordOption::Basic,
    ))
}

/// Documents whose `field` holds any of `values`.
///
/// Why not always a `TermSetQuery`: it builds an FST of its terms for every
/// query, and the builder's first allocation alone was 4% of the hub's CPU
/// under `concord bench recall`, where a reader's access tokens are a handful.
/// A few terms are a union of term queries instead; many stay a term set.
pub fn any_of(field: Field, values: &[String]) -> Box<dyn Query> {
    const UNION_UP_TO: usize = 16;
    match values {
        [one] => term(field, one),
        few if few.len() <= UNION_UP_TO => Box::new(BooleanQuery::new(
            few.iter()
                .map(|v| (Occur::Should, term(field, v)))
                .collect(),
        )),
        many => Box::new(TermSetQuery::new(
            many.iter().map(|v| Term::from_field_text(field, v)),
        )),
    }
}

pub fn range(field: Field, lo: Bound<i64>, hi: Bound<i64>) -> Box<dyn Query> {
    let t = |b: Bound<i64>| match b {
        Bound::Included(v) => Bound::Included(Term::from_field_i64(field, v)),
        Bound::Excluded(v) => Bound::Excluded(Term::from_field_i64(field, v)),
        Bound::Unbounded => Bound::Unbounded,
    };
    Box::new(RangeQuery::new(t(lo), t(hi)))
}

pub fn eq_i64(field: Field, v: i64) -> Box<dyn Query> {
    Box::new(TermQuery::new(
        Term::from_field_i64(field, v),
        IndexRecordOption::Basic,
    ))
}

pub fn all(clauses: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    if clauses.is_empty() {
        return Box::new(AllQuery);
    }
    Box::new(BooleanQuery::new(
        clauses.into_iter().map(|q| (Occur::Must, q)).collect(),
    ))
}

pub fn either(clauses: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(
        clauses.into_iter().map(|q| (Occur::Should, q)).collect(),
    ))
}

pub fn but_not(q: Box<dyn Query>, not: Box<dyn Query>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(vec![
        (Occur::Must, q),
        (Occur::MustNot, not),
    ]))
}

/// BM25 over the query's words (each word a term: operators in user text are
/// just words), restricted to the filter, which does not score.
pub fn text_query(
    idx: &Index,
    f: &Fields,
    text: &str,
    filter: Box<dyn Query>,
) -> Option<Box<dyn Query>> {
    let mut analyzer = idx.tokenizer_for_field(f.text).ok()?;
    let mut words: Vec<String> = Vec::new();
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        words.push(stream.token().text.clone());
    }
    words.sort();
    words.dedup();
    if words.is_empty() {
        return None;
    }
    let terms: Vec<(Occur, Box<dyn Query>)> = words
        .iter()
        .map(|w| {
            (
                Occur::Should,
                Box::new(TermQuery::new(
                    Term::from_field_text(f.text, w),
                    IndexRecordOption::WithFreqs,
                )) as Box<dyn Query>,
            )
        })
        .collect();
    Some(Box::new(BooleanQuery::new(vec![
        (
            Occur::Must,
            Box::new(BooleanQuery::new(terms)) as Box<dyn Query>,
        ),
        (Occur::Must, Box::new(ConstScoreQuery::new(filter, 0.0))),
    ])))
}

/// Top `k` by BM25: (seq, score, created_at).
pub fn top_bm25(
    reader: &IndexReader,
    q: &dyn Query,
    k: usize,
) -> concord_core::Result<Vec<(i64, f32, i64)>> {
    let searcher = reader.searcher();
    let top = searcher
        .search(q, &TopDocs::with_limit(k).order_by_score())
        .map_err(terr)?;
    let mut out = Vec::with_capacity(top.len());
    for (score, addr) in top {
        let seg = searcher.segment_reader(addr.segment_ord);
        let ff = seg.fast_fields();
        let seq = ff.i64("seq").map_err(terr)?.first(addr.doc_id);
        let created = ff.i64("created_at").map_err(terr)?.first(addr.doc_id);
        if let (Some(s), Some(c)) = (seq, created) {
            out.push((s, score, c));
        }
    }
    Ok(out)
}

/// Newest first (no query text, no vector): (seq, created_at).
pub fn newest(
    reader: &IndexReader,
    q: &dyn Query,
    k: usize,
) -> concord_core::Result<Vec<(i64, i64)>> {
    let mut all = matching(reader, q)?;
    all.sort_by_key(|e| std::cmp::Reverse(e.0));
    all.truncate(k);
    Ok(all)
}

/// The seqs a filter admits, as a bitset over seq: the allowed set of a filtered
/// vector search, which asks "is this node allowed?" for every node it walks.
///
/// Why a bitset filled straight from the `seq` column, and not a list of
/// (seq, created_at) turned into one: a broad filter admits most of the corpus,
/// and collecting 100,000 pairs, then the bitset from them, was more than half
/// of a hybrid query's CPU (`concord bench recall`).
#[derive(Default)]
pub struct SeqSet {
    words: Vec<u64>,
    len: usize,
}

impl SeqSet {
    fn insert(&mut self, seq: i64) {
        let Ok(i) = usize::try_from(seq) else { return };
        if self.words.len() <= i / 64 {
            self.words.resize(i / 64 + 1, 0);
        }
        let bit = 1u64 << (i % 64);
        if self.words[i / 64] & bit == 0 {
            self.words[i / 64] |= bit;
            self.len += 1;
        }
    }

    /// How many seqs are in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, seq: i64) -> bool {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.words.get(i / 64).map(|w| w & (1 << (i % 64)) != 0))
            .unwrap_or(false)
    }

    /// The seqs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let b = rest.trailing_zeros();
                    rest &= rest - 1;
                    (w * 64 + b as usize) as i64
                })
            })
        })
    }

    fn union(mut self, other: SeqSet) -> SeqSet {
        let (mut big, small) = if self.words.len() >= other.words.len() {
            (std::mem::take(&mut self.words), other.words)
        } else {
            (other.words, std::mem::take(&mut self.words))
        };
        for (a, b) in big.iter_mut().zip(small) {
            *a |= b;
        }
        let len = big.iter().map(|w| w.count_ones() as usize).sum();
        SeqSet { words: big, len }
    }
}

/// Every seq the filter admits (see [`SeqSet`]).
pub fn allowed_seqs(reader: &IndexReader, q: &dyn Query) -> concord_core::Result<SeqSet> {
    reader.searcher().search(q, &SeqSetCollector).map_err(terr)
}

struct SeqSetCollector;
struct SeqSetSegment {
    seq: tantivy::columnar::Column<i64>,
    buf: Vec<Option<i64>>,
    out: SeqSet,
}

impl Collector for SeqSetCollector {
    type Fruit = SeqSet;
    type Child = SeqSetSegment;
    fn for_segment(&self, _: u32, seg: &SegmentReader) -> tantivy::Result<SeqSetSegment> {
        let seq = seg.fast_fields().i64("seq")?;
        let mut out = SeqSet::default();
        // Sized once for the segment's largest seq, not grown word by word.
        if let Ok(max) = usize::try_from(seq.max_value()) {
            out.words.reserve(max / 64 + 1);
        }
        Ok(SeqSetSegment {
            seq,
            buf: Vec::new(),
            out,
        })
    }
    fn requires_scoring(&self) -> bool {
        false
    }
    fn merge_fruits(&self, fruits: Vec<SeqSet>) -> tantivy::Result<SeqSet> {
        Ok(fruits.into_iter().fold(SeqSet::default(), SeqSet::union))
    }
}

impl SegmentCollector for SeqSetSegment {
    type Fruit = SeqSet;
    fn collect(&mut self, doc: DocId, _: Score) {
        if let Some(s) = self.seq.first(doc) {
            self.out.insert(s);
        }
    }
    /// A block of matching docs at a time: one column read per block.
    fn collect_block(&mut self, docs: &[DocId]) {
        self.buf.clear();
        self.buf.resize(docs.len(), None);
        self.seq.first_vals(docs, &mut self.buf);
        for s in self.buf.iter().flatten() {
            self.out.insert(*s);
        }
    }
    fn harvest(self) -> SeqSet {
        self.out
    }
}

/// Every (seq, created_at) the filter admits: the allowed set of a vector search.
pub fn matching(reader: &IndexReader, q: &dyn Query) -> concord_core::Result<Vec<(i64, i64)>> {
    reader.searcher().search(q, &SeqCollector).map_err(terr)
}

struct SeqCollector;
struct SeqSegment {
    seq: tantivy::columnar::Column<i64>,
    created: tantivy::columnar::Column<i64>,
    out: Vec<(i64, i64)>,
}

impl Collector for SeqCollector {
    type Fruit = Vec<(i64, i64)>;
    type Child = SeqSegment;
    fn for_segment(&self, _: u32, seg: &SegmentReader) -> tantivy::Result<SeqSegment> {
        let ff = seg.fast_fields();
        Ok(SeqSegment {
            seq: ff.i64("seq")?,
            created: ff.i64("created_at")?,
            out: Vec::new(),
        })
    }
    fn requires_scoring(&self) -> bool {
        false
    }
    fn merge_fruits(&self, fruits: Vec<Vec<(i64, i64)>>) -> tantivy::Result<Vec<(i64, i64)>> {
        Ok(fruits.into_iter().flatten().collect())
    }
}

impl SegmentCollector for SeqSegment {
    type Fruit = Vec<(i64, i64)>;
    fn collect(&mut self, doc: DocId, _: Score) {
        if let (Some(s), Some(c)) = (self.seq.first(doc), self.created.first(doc)) {
            self.out.push((s, c));
        }
    }
    fn harvest(self) -> Vec<(i64, i64)> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_documents_and_watermark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut t = TextIndex::open(Some(dir.path())).unwrap();
            let mut doc = TantivyDocument::default();
            doc.add_text(t.fields.text, "hello");
            doc.add_i64(t.fields.seq, 1);
            t.writer.add_document(doc).unwrap();
            t.commit(7).unwrap();
        }
        let t = TextIndex::open(Some(dir.path())).unwrap();
        assert_eq!(t.watermark(), 7);
        assert_eq!(t.reader().searcher().num_docs(), 1);
    }

    /// The bitset agrees with the pairs collector, over several segments (one
    /// per commit), with and without a filter.
    #[test]
    fn allowed_seqs_are_the_matching_seqs() {
        let mut t = TextIndex::open(None).unwrap();
        for (commit, range) in [(1, 0..300), (2, 300..700), (3, 700..1000)] {
            for i in range {
                let mut doc = TantivyDocument::default();
                doc.add_text(t.fields.text, if i % 3 == 0 { "fizz" } else { "buzz" });
                doc.add_i64(t.fields.seq, i * 7 + 1);
                doc.add_i64(t.fields.created_at, i);
                t.writer.add_document(doc).unwrap();
            }
            t.commit(commit).unwrap();
        }
        let reader = t.reader();
        assert!(reader.searcher().segment_readers().len() > 1);
        let fizz = TermQuery::new(
            Term::from_field_text(t.fields.text, "fizz"),
            IndexRecordOption::Basic,
        );
        for q in [&AllQuery as &dyn Query, &fizz] {
            let mut pairs: Vec<i64> = matching(&reader, q).unwrap().iter().map(|p| p.0).collect();
            pairs.sort_unstable();
            let set = allowed_seqs(&reader, q).unwrap();
            assert_eq!(set.iter().collect::<Vec<_>>(), pairs);
            assert_eq!(set.len(), pairs.len());
            assert!(pairs.iter().all(|&s| set.contains(s)));
            assert!(!set.contains(0) && !set.contains(-1) && !set.contains(7001));
        }
    }

    /// One value, a few and many (a term query, a union, a term set) admit the
    /// same documents: those whose field holds any of the values.
    #[test]
    fn any_of_admits_documents_holding_any_value() {
        let mut t = TextIndex::open(None).unwrap();
        for i in 0..400i64 {
            let mut doc = TantivyDocument::default();
            doc.add_text(t.fields.space, format!("space-{}", i % 40));
            doc.add_i64(t.fields.seq, i + 1);
            t.writer.add_document(doc).unwrap();
        }
        t.commit(1).unwrap();
        let reader = t.reader();
        for n in [0usize, 1, 5, 16, 17, 40] {
            let values: Vec<String> = (0..n).map(|k| format!("space-{k}")).collect();
            let got: Vec<i64> = allowed_seqs(&reader, any_of(t.fields.space, &values).as_ref())
                .unwrap()
                .iter()
                .collect();
            let want: Vec<i64> = (0..400i64)
                .filter(|i| ((i % 40) as usize) < n)
                .map(|i| i + 1)
                .collect();
            assert_eq!(got, want, "{n} values");
        }
    }

    proptest::proptest! {
        /// A set (and a union of sets) holds exactly the seqs put in it.
        #[test]
        fn seq_sets_hold_what_was_inserted(
            a in proptest::collection::vec(-5i64..5000, 0..300),
            b in proptest::collection::vec(0i64..200, 0..300),
        ) {
            let (mut x, mut y) = (SeqSet::default(), SeqSet::default());
            a.iter().for_each(|&s| x.insert(s));
            b.iter().for_each(|&s| y.insert(s));
            let both = x.union(y);
            let want: std::collections::BTreeSet<i64> =
                a.iter().chain(&b).copied().filter(|&s| s >= 0).collect();
            proptest::prop_assert_eq!(both.iter().collect::<Vec<_>>(), want.iter().copied().collect::<Vec<_>>());
            proptest::prop_assert_eq!(both.len(), want.len());
            for s in -5..5100 {
                proptest::prop_assert_eq!(both.contains(s), want.contains(&s));
            }
        }
    }

    const DOCS: &[&str] = &[
        "the deploy to staging failed on the migration step",
        "Ürün kataloğu güncellendi; 価格は変更なし",
        "AND OR NOT \"quoted\" title:field +must -never * ? ~2 ^3 (group)",
        "rollback plan: revert 4f2a, then rerun the canary",
    ];

    fn indexed() -> TextIndex {
        let mut t = TextIndex::open(None).unwrap();
        for (i, text) in DOCS.iter().enumerate() {
            let mut doc = TantivyDocument::default();
            doc.add_text(t.fields.text, text);
            doc.add_i64(t.fields.seq, i as i64 + 1);
            doc.add_i64(t.fields.created_at, i as i64);
            t.writer.add_document(doc).unwrap();
        }
        t.commit(DOCS.len() as i64).unwrap();
        t
    }

    proptest::proptest! {
        // Each case builds an index: fewer cases, still varied input.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Query text is user input: any of it (query-language operators, quotes,
        /// unbalanced brackets, any script) is only words. It never fails or panics,
        /// finds only indexed memories, and a word of a memory among noise still
        /// finds that memory.
        #[test]
        fn any_query_text_is_words(
            noise in ".{0,40}|[-+*?~^:()\\[\\]{}\"!&| A-Za-z0-9]{0,40}",
            pick in 0usize..4,
            word in 0usize..4,
        ) {
            let t = indexed();
            let all: Box<dyn Query> = Box::new(AllQuery);
            if let Some(q) = text_query(t.index(), &t.fields, &noise, all) {
                let hits = top_bm25(&t.reader(), q.as_ref(), 10).unwrap();
                proptest::prop_assert!(hits.iter().all(|(seq, _, _)| (1..=DOCS.len() as i64).contains(seq)));
            }
            let words: Vec<&str> = DOCS[pick]
                .split_whitespace()
                .filter(|w| w.chars().any(char::is_alphanumeric))
                .collect();
            let w = words[word % words.len()];
            let text = format!("{noise} {w} {noise}");
            let all: Box<dyn Query> = Box::new(AllQuery);
            let q = text_query(t.index(), &t.fields, &text, all);
            proptest::prop_assert!(q.is_some(), "no words found in {:?}", text);
            let hits = top_bm25(&t.reader(), q.unwrap().as_ref(), 10).unwrap();
            let wanted = pick as i64 + 1;
            proptest::prop_assert!(hits.iter().any(|(seq, _, _)| *seq == wanted), "{:?} did not find memory {}", text, wanted);
        }
    }
}

//! A small Parquet writer for flat tables (what `safetune results --format parquet` needs), and
//! a reader of exactly what it writes, for the tests.
//!
//! The file: `PAR1`, one row group with one column chunk per column, each chunk one version-1
//! data page (PLAIN values, no compression, no dictionary, no statistics), then the file
//! metadata in Thrift's compact protocol, its length (4 bytes, little-endian) and `PAR1`.
//! Columns are UTF-8 strings (`BYTE_ARRAY` annotated `STRING`), `INT64` or `DOUBLE`; an optional
//! column stores definition levels (bit width 1, one bit-packed run, 4-byte length prefix) and
//! only its non-null values. That subset is what every Parquet reader handles; writing it by hand
//! keeps the arrow and parquet crates out of the build.

/// The values of one column; `None` is null (allowed only in an optional column).
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnData {
    Str(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
}

/// A column to write.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetColumn {
    pub name: String,
    /// A required column has no definition levels; a null in it is written as an empty string
    /// or zero.
    pub required: bool,
    pub data: ColumnData,
}

// Parquet's enum values (parquet.thrift).
const TYPE_INT64: i32 = 2;
const TYPE_DOUBLE: i32 = 5;
const TYPE_BYTE_ARRAY: i32 = 6;
const REP_REQUIRED: i32 = 0;
const REP_OPTIONAL: i32 = 1;
const CONVERTED_UTF8: i32 = 0;
const ENC_PLAIN: i32 = 0;
const ENC_RLE: i32 = 3;
const PAGE_DATA: i32 = 0;
const CODEC_UNCOMPRESSED: i32 = 0;

// Thrift compact protocol type ids.
const CT_TRUE: u8 = 1;
const CT_FALSE: u8 = 2;
const CT_I32: u8 = 5;
const CT_I64: u8 = 6;
const CT_DOUBLE: u8 = 7;
const CT_BINARY: u8 = 8;
const CT_LIST: u8 = 9;
const CT_STRUCT: u8 = 12;

/// Writes Thrift's compact protocol: structs as field headers with id deltas, zigzag varints.
#[derive(Default)]
struct Thrift {
    out: Vec<u8>,
    last: Vec<i16>,
}

impl Thrift {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.out.push(b);
                return;
            }
            self.out.push(b | 0x80);
        }
    }
    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn field(&mut self, id: i16, ty: u8) {
        let last = self.last.last().copied().unwrap_or(0);
        let delta = id - last;
        if (1..=15).contains(&delta) {
            self.out.push(((delta as u8) << 4) | ty);
        } else {
            self.out.push(ty);
            self.zigzag(i64::from(id));
        }
        if let Some(l) = self.last.last_mut() {
            *l = id;
        }
    }
    fn begin(&mut self) {
        self.last.push(0);
    }
    fn end(&mut self) {
        self.out.push(0);
        self.last.pop();
    }
    fn i32(&mut self, id: i16, v: i32) {
        self.field(id, CT_I32);
        self.zigzag(i64::from(v));
    }
    fn i64(&mut self, id: i16, v: i64) {
        self.field(id, CT_I64);
        self.zigzag(v);
    }
    fn bytes(&mut self, id: i16, v: &[u8]) {
        self.field(id, CT_BINARY);
        self.varint(v.len() as u64);
        self.out.extend_from_slice(v);
    }
    fn struct_field(&mut self, id: i16) {
        self.field(id, CT_STRUCT);
        self.begin();
    }
    fn list(&mut self, id: i16, elem: u8, n: usize) {
        self.field(id, CT_LIST);
        if n < 15 {
            self.out.push(((n as u8) << 4) | elem);
        } else {
            self.out.push(0xf0 | elem);
            self.varint(n as u64);
        }
    }
}

impl ColumnData {
    fn len(&self) -> usize {
        match self {
            ColumnData::Str(v) => v.len(),
            ColumnData::Int(v) => v.len(),
            ColumnData::Float(v) => v.len(),
        }
    }
    fn physical(&self) -> i32 {
        match self {
            ColumnData::Str(_) => TYPE_BYTE_ARRAY,
            ColumnData::Int(_) => TYPE_INT64,
            ColumnData::Float(_) => TYPE_DOUBLE,
        }
    }
    fn is_null(&self, i: usize) -> bool {
        match self {
            ColumnData::Str(v) => v[i].is_none(),
            ColumnData::Int(v) => v[i].is_none(),
            ColumnData::Float(v) => v[i].is_none(),
        }
    }
    /// PLAIN encoding of the values; nulls skipped when `optional`, else written as empty/zero.
    fn plain(&self, optional: bool, out: &mut Vec<u8>) {
        match self {
            ColumnData::Str(v) => {
                for s in v {
                    if s.is_none() && optional {
                        continue;
                    }
                    let b = s.as_deref().unwrap_or("").as_bytes();
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
            }
            ColumnData::Int(v) => {
                for x in v {
                    if x.is_none() && optional {
                        continue;
                    }
                    out.extend_from_slice(&x.unwrap_or(0).to_le_bytes());
                }
            }
            ColumnData::Float(v) => {
                for x in v {
                    if x.is_none() && optional {
                        continue;
                    }
                    out.extend_from_slice(&x.unwrap_or(0.0).to_le_bytes());
                }
            }
        }
    }
}

/// Definition levels (1 = present) as one bit-packed run of the RLE/bit-packing hybrid,
/// with its 4-byte length prefix.
fn def_levels(col: &ColumnData, rows: usize) -> Vec<u8> {
    let groups = rows.div_ceil(8);
    let mut run = Thrift::default();
    run.varint(((groups as u64) << 1) | 1);
    let mut bits = vec![0u8; groups];
    for i in 0..rows {
        if !col.is_null(i) {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    run.out.extend_from_slice(&bits);
    let mut out = (run.out.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&run.out);
    out
}

/// The whole Parquet file of `columns` (each `rows` long).
pub fn write(columns: &[ParquetColumn], rows: usize) -> Vec<u8> {
    let mut file = b"PAR1".to_vec();
    // (offset of the page, bytes of header + page)
    let mut chunks = Vec::with_capacity(columns.len());
    for c in columns {
        debug_assert_eq!(c.data.len(), rows, "column {}", c.name);
        let mut page = Vec::new();
        if !c.required {
            page.extend_from_slice(&def_levels(&c.data, rows));
        }
        c.data.plain(!c.required, &mut page);
        let mut h = Thrift::default();
        h.begin();
        h.i32(1, PAGE_DATA);
        h.i32(2, page.len() as i32);
        h.i32(3, page.len() as i32);
        h.struct_field(5);
        h.i32(1, rows as i32);
        h.i32(2, ENC_PLAIN);
        h.i32(3, ENC_RLE);
        h.i32(4, ENC_RLE);
        h.end();
        h.end();
        let offset = file.len();
        file.extend_from_slice(&h.out);
        file.extend_from_slice(&page);
        chunks.push((offset, h.out.len() + page.len()));
    }
    let mut m = Thrift::default();
    m.begin();
    m.i32(1, 1);
    m.list(2, CT_STRUCT, columns.len() + 1);
    // The root of the schema, then one leaf per column.
    m.begin();
    m.bytes(4, b"schema");
    m.i32(5, columns.len() as i32);
    m.end();
    for c in columns {
        m.begin();
        m.i32(1, c.data.physical());
        m.i32(
            3,
            if c.required {
                REP_REQUIRED
            } else {
                REP_OPTIONAL
            },
        );
        m.bytes(4, c.name.as_bytes());
        if matches!(c.data, ColumnData::Str(_)) {
            m.i32(6, CONVERTED_UTF8);
            // logicalType: the union's STRING member, an empty struct.
            m.struct_field(10);
            m.struct_field(1);
            m.end();
            m.end();
        }
        m.end();
    }
    m.i64(3, rows as i64);
    m.list(4, CT_STRUCT, 1);
    m.begin();
    m.list(1, CT_STRUCT, columns.len());
    let mut total = 0i64;
    for (c, &(offset, size)) in columns.iter().zip(&chunks) {
        total += size as i64;
        m.begin();
        m.i64(2, offset as i64);
        m.struct_field(3);
        m.i32(1, c.data.physical());
        let encodings: &[i32] = if c.required {
            &[ENC_PLAIN]
        } else {
            &[ENC_PLAIN, ENC_RLE]
        };
        m.list(2, CT_I32, encodings.len());
        for e in encodings {
            m.zigzag(i64::from(*e));
        }
        m.list(3, CT_BINARY, 1);
        m.varint(c.name.len() as u64);
        m.out.extend_from_slice(c.name.as_bytes());
        m.i32(4, CODEC_UNCOMPRESSED);
        m.i64(5, rows as i64);
        m.i64(6, size as i64);
        m.i64(7, size as i64);
        m.i64(9, offset as i64);
        m.end();
        m.end();
    }
    m.i64(2, total);
    m.i64(3, rows as i64);
    m.end();
    m.bytes(
        6,
        concat!("safetune ", env!("CARGO_PKG_VERSION")).as_bytes(),
    );
    m.end();
    file.extend_from_slice(&m.out);
    file.extend_from_slice(&(m.out.len() as u32).to_le_bytes());
    file.extend_from_slice(b"PAR1");
    file
}

// ---------------------------------------------------------------------------------------------
// Reading back (what `write` produces, and little more)

/// A decoded Thrift compact value.
#[derive(Debug, Clone, PartialEq)]
pub enum Thr {
    Bool(bool),
    Int(i64),
    Double(f64),
    Bin(Vec<u8>),
    List(Vec<Thr>),
    Struct(Vec<(i16, Thr)>),
}

impl Thr {
    /// Field `id` of a struct.
    pub fn get(&self, id: i16) -> Option<&Thr> {
        match self {
            Thr::Struct(f) => f.iter().find(|(i, _)| *i == id).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn int(&self) -> Option<i64> {
        match self {
            Thr::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn list(&self) -> Option<&[Thr]> {
        match self {
            Thr::List(l) => Some(l),
            _ => None,
        }
    }
    pub fn text(&self) -> Option<String> {
        match self {
            Thr::Bin(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.at).ok_or("thrift: unexpected end")?;
        self.at += 1;
        Ok(v)
    }
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("thrift: varint too long".into())
    }
    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    fn value(&mut self, ty: u8) -> Result<Thr, String> {
        Ok(match ty {
            CT_TRUE => Thr::Bool(true),
            CT_FALSE => Thr::Bool(false),
            3 => Thr::Int(i64::from(self.byte()? as i8)),
            4..=6 => Thr::Int(self.zigzag()?),
            CT_DOUBLE => {
                let s = self
                    .b
                    .get(self.at..self.at + 8)
                    .ok_or("thrift: short double")?;
                self.at += 8;
                Thr::Double(f64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
            }
            CT_BINARY => {
                let n = self.varint()? as usize;
                let s = self
                    .b
                    .get(self.at..self.at + n)
                    .ok_or("thrift: short binary")?;
                self.at += n;
                Thr::Bin(s.to_vec())
            }
            CT_LIST | 10 => {
                let h = self.byte()?;
                let n = if h >> 4 == 15 {
                    self.varint()? as usize
                } else {
                    (h >> 4) as usize
                };
                let elem = h & 0x0f;
                let mut l = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    // Booleans in a list are one byte each.
                    l.push(if elem == CT_TRUE || elem == CT_FALSE {
                        Thr::Bool(self.byte()? == 1)
                    } else {
                        self.value(elem)?
                    });
                }
                Thr::List(l)
            }
            CT_STRUCT => self.structure()?,
            t => return Err(format!("thrift: type {t} not supported")),
        })
    }
    fn structure(&mut self) -> Result<Thr, String> {
        let mut fields = Vec::new();
        let mut last = 0i16;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Ok(Thr::Struct(fields));
            }
            let ty = h & 0x0f;
            let id = if h >> 4 == 0 {
                self.zigzag()? as i16
            } else {
                last + i16::from(h >> 4)
            };
            last = id;
            fields.push((id, self.value(ty)?));
        }
    }
}

/// Decodes one compact-protocol struct at the start of `b`; returns it and its length.
pub fn read_struct(b: &[u8]) -> Result<(Thr, usize), String> {
    let mut r = Reader { b, at: 0 };
    let s = r.structure()?;
    Ok((s, r.at))
}

/// A file read back by [`read`]: the footer and every column's values.
#[derive(Debug, Clone)]
pub struct ReadBack {
    pub rows: i64,
    /// The footer (`FileMetaData`).
    pub meta: Thr,
    pub columns: Vec<ParquetColumn>,
}

/// Reads a file [`write`] wrote: checks both magics, decodes the footer, and each column's one
/// data page (definition levels and PLAIN values).
pub fn read(file: &[u8]) -> Result<ReadBack, String> {
    if file.len() < 12 || &file[..4] != b"PAR1" || &file[file.len() - 4..] != b"PAR1" {
        return Err("not a Parquet file (PAR1 magic missing)".into());
    }
    let n = u32::from_le_bytes(
        file[file.len() - 8..file.len() - 4]
            .try_into()
            .unwrap_or([0; 4]),
    ) as usize;
    let start = file
        .len()
        .checked_sub(8 + n)
        .ok_or("footer length past the start")?;
    let (meta, used) = read_struct(&file[start..file.len() - 8])?;
    if used != n {
        return Err(format!("footer is {n} bytes but its struct {used}"));
    }
    let rows = meta.get(3).and_then(Thr::int).ok_or("no num_rows")?;
    let schema = meta.get(2).and_then(Thr::list).ok_or("no schema")?;
    let groups = meta.get(4).and_then(Thr::list).ok_or("no row groups")?;
    let chunks = groups
        .first()
        .and_then(|g| g.get(1))
        .and_then(Thr::list)
        .ok_or("no column chunks")?;
    let mut columns = Vec::new();
    for (leaf, chunk) in schema.iter().skip(1).zip(chunks) {
        let name = leaf
            .get(4)
            .and_then(Thr::text)
            .ok_or("column without name")?;
        let ty = leaf
            .get(1)
            .and_then(Thr::int)
            .ok_or("column without type")?;
        let required = leaf.get(3).and_then(Thr::int) == Some(i64::from(REP_REQUIRED));
        let cm = chunk.get(3).ok_or("chunk without metadata")?;
        let off = cm.get(9).and_then(Thr::int).ok_or("no data_page_offset")? as usize;
        let (header, hlen) = read_struct(file.get(off..).ok_or("page offset past the end")?)?;
        let size = header.get(3).and_then(Thr::int).ok_or("no page size")? as usize;
        let page = file
            .get(off + hlen..off + hlen + size)
            .ok_or("page past the end")?;
        let count = header
            .get(5)
            .and_then(|d| d.get(1))
            .and_then(Thr::int)
            .ok_or("no num_values")? as usize;
        let (present, mut at) = if required {
            (vec![true; count], 0)
        } else {
            let len = u32::from_le_bytes(
                page.get(..4)
                    .ok_or("short page")?
                    .try_into()
                    .unwrap_or([0; 4]),
            ) as usize;
            (
                hybrid_levels(page.get(4..4 + len).ok_or("short levels")?, count)?,
                4 + len,
            )
        };
        let mut take = |k: usize| -> Result<&[u8], String> {
            let s = page.get(at..at + k).ok_or("short values")?;
            at += k;
            Ok(s)
        };
        let data = match ty as i32 {
            TYPE_BYTE_ARRAY => {
                let mut v = Vec::with_capacity(count);
                for &p in &present {
                    if !p {
                        v.push(None);
                        continue;
                    }
                    let n = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4])) as usize;
                    v.push(Some(
                        String::from_utf8(take(n)?.to_vec()).map_err(|e| e.to_string())?,
                    ));
                }
                ColumnData::Str(v)
            }
            TYPE_INT64 => {
                let mut v = Vec::with_capacity(count);
                for &p in &present {
                    v.push(if p {
                        Some(i64::from_le_bytes(take(8)?.try_into().unwrap_or([0; 8])))
                    } else {
                        None
                    });
                }
                ColumnData::Int(v)
            }
            TYPE_DOUBLE => {
                let mut v = Vec::with_capacity(count);
                for &p in &present {
                    v.push(if p {
                        Some(f64::from_le_bytes(take(8)?.try_into().unwrap_or([0; 8])))
                    } else {
                        None
                    });
                }
                ColumnData::Float(v)
            }
            t => return Err(format!("column {name}: physical type {t} not read here")),
        };
        columns.push(ParquetColumn {
            name,
            required,
            data,
        });
    }
    Ok(ReadBack {
        rows,
        meta,
        columns,
    })
}

/// Decodes `count` definition levels of bit width 1 (RLE and bit-packed runs).
fn hybrid_levels(b: &[u8], count: usize) -> Result<Vec<bool>, String> {
    let mut r = Reader { b, at: 0 };
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let h = r.varint()?;
        if h & 1 == 1 {
            let groups = (h >> 1) as usize;
            for _ in 0..groups {
                let byte = r.byte()?;
                for bit in 0..8 {
                    if out.len() < count {
                        out.push(byte >> bit & 1 == 1);
                    }
                }
            }
        } else {
            let n = (h >> 1) as usize;
            let v = r.byte()? == 1;
            out.extend(std::iter::repeat_n(v, n.min(count - out.len())));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_with_nulls_and_every_type() {
        let cols = vec![
            ParquetColumn {
                name: "s".into(),
                required: true,
                data: ColumnData::Str((0..20).map(|i| Some(format!("row {i} é"))).collect()),
            },
            ParquetColumn {
                name: "o".into(),
                required: false,
                data: ColumnData::Str(
                    (0..20)
                        .map(|i| (i % 3 != 0).then(|| i.to_string()))
                        .collect(),
                ),
            },
            ParquetColumn {
                name: "i".into(),
                required: false,
                data: ColumnData::Int((0..20).map(|i| (i % 2 == 0).then_some(i - 5)).collect()),
            },
            ParquetColumn {
                name: "f".into(),
                required: false,
                data: ColumnData::Float((0..20).map(|i| Some(f64::from(i) / 4.0)).collect()),
            },
        ];
        let file = write(&cols, 20);
        let back = read(&file).unwrap();
        assert_eq!(back.rows, 20);
        assert_eq!(back.columns, cols);
        // The schema root names its children; 16 fields take the long list header.
        let many: Vec<ParquetColumn> = (0..16)
            .map(|i| ParquetColumn {
                name: format!("c{i}"),
                required: true,
                data: ColumnData::Int(vec![Some(i)]),
            })
            .collect();
        let back = read(&write(&many, 1)).unwrap();
        assert_eq!(back.columns, many);
        assert!(read(b"PAR1junkPAR1").is_err());
    }

    #[test]
    fn thrift_field_ids_past_a_gap_of_fifteen_use_the_long_form() {
        let mut t = Thrift::default();
        t.begin();
        t.i32(1, -3);
        t.i64(20, 1 << 40);
        t.end();
        let (s, n) = read_struct(&t.out).unwrap();
        assert_eq!(n, t.out.len());
        assert_eq!(s.get(1).and_then(Thr::int), Some(-3));
        assert_eq!(s.get(20).and_then(Thr::int), Some(1 << 40));
    }
}

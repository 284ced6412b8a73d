//! A small pickle reader for exactly what verification `.bin` files hold: lists and tuples of
//! byte strings (Python-2 `str`, Python-3 `bytes`, protocol-2 `_codecs.encode` reductions,
//! `bytearray`), 1-D numpy arrays (`_reconstruct` + `BUILD`, or protocol 5 `_frombuffer`),
//! numpy scalars, bools and ints.
//!
//! It runs the binary opcodes of protocols 2–5 on a value model where reductions stay symbolic
//! (`Object`) unless they are one of the few known constructors; no code is ever executed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Rc<[u8]>),
    Str(Rc<str>),
    List(Rc<RefCell<Vec<Value>>>),
    Tuple(Rc<[Value]>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A `module.name` reference.
    Global(Rc<str>, Rc<str>),
    /// A reduction `callable(*args)` with the state `BUILD` gave it.
    Object(Rc<RefCell<Object>>),
    /// A numpy array: dtype descriptor (e.g. `u1`, `b1`), shape, raw data.
    NdArray {
        dtype: Rc<str>,
        shape: Rc<[usize]>,
        data: Rc<[u8]>,
    },
    /// A numpy dtype.
    Dtype(Rc<str>),
}

#[derive(Debug)]
pub(crate) struct Object {
    pub module: Rc<str>,
    pub name: Rc<str>,
    pub args: Value,
    pub state: Option<Value>,
}

impl Value {
    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Str(_) => "str".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(m, n) => format!("global {m}.{n}"),
            Value::Object(o) => {
                let o = o.borrow();
                format!("object {}.{}", o.module, o.name)
            }
            Value::NdArray { dtype, .. } => format!("numpy array of {dtype}"),
            Value::Dtype(d) => format!("numpy dtype {d}"),
        }
    }

    /// Items of a list or tuple.
    pub fn items(&self) -> Result<Vec<Value>, String> {
        match self {
            Value::List(l) => Ok(l.borrow().clone()),
            Value::Tuple(t) => Ok(t.to_vec()),
            other => Err(format!("expected a list or tuple, found {}", other.kind())),
        }
    }

    /// The bytes of a byte-like value (bytes, py2 str, uint8/int8 numpy array, numpy object
    /// resolved by `BUILD`).
    pub fn bytes(&self) -> Result<Rc<[u8]>, String> {
        match self {
            Value::Bytes(b) => Ok(b.clone()),
            Value::NdArray { dtype, shape, data } => {
                if !matches!(&**dtype, "u1" | "i1" | "|u1" | "|i1" | "uint8" | "int8") {
                    return Err(format!("numpy array of dtype {dtype}, expected uint8"));
                }
                if shape.len() > 1 && shape.iter().filter(|&&s| s != 1).count() > 1 {
                    return Err(format!("numpy array of shape {shape:?}, expected 1-D"));
                }
                Ok(data.clone())
            }
            Value::Object(_) => resolve(self)?.bytes(),
            other => Err(format!("expected image bytes, found {}", other.kind())),
        }
    }

    /// A truth value: bool, int, numpy bool scalar.
    pub fn truth(&self) -> Result<bool, String> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Int(i) => Ok(*i != 0),
            Value::Float(f) => Ok(*f != 0.0),
            Value::Object(_) => resolve(self)?.truth(),
            other => Err(format!("expected a bool, found {}", other.kind())),
        }
    }

    /// A list of truth values: a list/tuple of bools, or a numpy bool/int array.
    pub fn truths(&self) -> Result<Vec<bool>, String> {
        match self {
            Value::List(_) | Value::Tuple(_) => self.items()?.iter().map(Value::truth).collect(),
            Value::NdArray { dtype, data, .. } => {
                let width = match dtype.trim_start_matches(['|', '<', '>', '=']) {
                    "b1" | "u1" | "i1" | "bool" => 1,
                    "u2" | "i2" => 2,
                    "u4" | "i4" => 4,
                    "u8" | "i8" => 8,
                    d => return Err(format!("numpy array of dtype {d}, expected bools")),
                };
                Ok(data
                    .chunks_exact(width)
                    .map(|c| c.iter().any(|&b| b != 0))
                    .collect())
            }
            Value::Object(_) => resolve(self)?.truths(),
            other => Err(format!("expected a list of bools, found {}", other.kind())),
        }
    }
}

fn is_numpy(module: &str) -> bool {
    module == "numpy" || module.starts_with("numpy.")
}

/// Turn a symbolic object into a concrete value where the constructor is known.
fn resolve(v: &Value) -> Result<Value, String> {
    let Value::Object(o) = v else {
        return Ok(v.clone());
    };
    let o = o.borrow();
    let args = o.args.items().unwrap_or_default();
    match (&*o.module, &*o.name) {
        (m, "_reconstruct") if is_numpy(m) => {
            // state: (version, shape, dtype, is_fortran, rawdata)
            let state = o
                .state
                .as_ref()
                .ok_or("numpy _reconstruct without BUILD state")?
                .items()?;
            if state.len() != 5 {
                return Err(format!(
                    "numpy array state of {} items, expected 5",
                    state.len()
                ));
            }
            let shape = shape_of(&state[1])?;
            let dtype = dtype_of(&state[2])?;
            let data = state[4].bytes()?;
            Ok(Value::NdArray { dtype, shape, data })
        }
        (m, "scalar") if is_numpy(m) => {
            // scalar(dtype, raw bytes)
            let dtype = dtype_of(args.first().ok_or("numpy scalar without dtype")?)?;
            let data = args.get(1).ok_or("numpy scalar without data")?.bytes()?;
            Ok(Value::NdArray {
                dtype,
                shape: Rc::from(Vec::new()),
                data,
            })
        }
        (m, n) => Err(format!("unsupported pickled object {m}.{n}")),
    }
}

fn shape_of(v: &Value) -> Result<Rc<[usize]>, String> {
    v.items()?
        .iter()
        .map(|d| match d {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!("bad numpy shape entry {}", other.kind())),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Rc::from)
}

fn dtype_of(v: &Value) -> Result<Rc<str>, String> {
    match v {
        Value::Dtype(d) => Ok(d.clone()),
        Value::Str(s) => Ok(s.clone()),
        other => Err(format!("expected a numpy dtype, found {}", other.kind())),
    }
}

/// Apply `callable(*args)` for the constructors we know, else keep it symbolic.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = callable else {
        return Err(format!("REDUCE on {}, expected a global", callable.kind()));
    };
    let items = args.items()?;
    match (&*module, &*name) {
        // Protocol 2 written by Python 3: bytes(x) == _codecs.encode(str, "latin1").
        ("_codecs", "encode") => match items.as_slice() {
            [Value::Str(s), ..] => latin1(s).map(Value::Bytes),
            [Value::Bytes(b), ..] => Ok(Value::Bytes(b.clone())),
            _ => Err("_codecs.encode with unexpected arguments".into()),
        },
        ("builtins" | "__builtin__", "bytes" | "bytearray") => match items.as_slice() {
            [] => Ok(Value::Bytes(Rc::from(Vec::new()))),
            [Value::Str(s), ..] => latin1(s).map(Value::Bytes),
            [Value::Bytes(b), ..] => Ok(Value::Bytes(b.clone())),
            [Value::List(l)] => l
                .borrow()
                .iter()
                .map(|v| match v {
                    Value::Int(i) => u8::try_from(*i).map_err(|_| "byte out of range".to_string()),
                    _ => Err("bytearray of non-ints".to_string()),
                })
                .collect::<Result<Vec<u8>, _>>()
                .map(|b| Value::Bytes(Rc::from(b))),
            _ => Err(format!("{module}.{name} with unexpected arguments")),
        },
        (m, "dtype") if is_numpy(m) => match items.first() {
            Some(Value::Str(s)) => Ok(Value::Dtype(s.clone())),
            _ => Err("numpy.dtype with unexpected arguments".into()),
        },
        // Protocol 5: _frombuffer(buffer, dtype, shape, order).
        (m, "_frombuffer") if is_numpy(m) => match items.as_slice() {
            [buf, dtype, shape, ..] => Ok(Value::NdArray {
                data: buf.bytes()?,
                dtype: dtype_of(dtype)?,
                shape: shape_of(shape)?,
            }),
            _ => Err("numpy _frombuffer with unexpected arguments".into()),
        },
        _ => Ok(Value::Object(Rc::new(RefCell::new(Object {
            module,
            name,
            args,
            state: None,
        })))),
    }
}

fn latin1(s: &str) -> Result<Rc<[u8]>, String> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("non-latin-1 character {c:?}")))
        .collect::<Result<Vec<u8>, _>>()
        .map(Rc::from)
}

enum Slot {
    Mark,
    Value(Value),
}

/// Run the pickle in `data`; returns the value of `STOP`. Errors name the byte offset.
pub(crate) fn load(data: &[u8]) -> Result<Value, String> {
    match data.first() {
        Some(0x80) => {}
        Some(&b) => {
            return Err(format!(
                "not a pickle: byte 0 is 0x{b:02x}, expected the PROTO opcode 0x80 of a protocol 2–5 pickle"
            ))
        }
        None => return Err("empty file, not a pickle".into()),
    }
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<usize, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize, op_pos: usize, op: u8) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "truncated pickle: opcode 0x{op:02x} at byte {op_pos} needs {n} bytes, only {} remain",
                self.data.len() - self.pos
            )),
        }
    }

    fn uint(&mut self, n: usize, op_pos: usize, op: u8) -> Result<u64, String> {
        let b = self.take(n, op_pos, op)?;
        let mut v = 0u64;
        for (i, &x) in b.iter().enumerate() {
            v |= u64::from(x) << (8 * i);
        }
        Ok(v)
    }

    fn pop(&mut self, op_pos: usize) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => Err(format!("unexpected MARK on the stack at byte {op_pos}")),
            None => Err(format!("stack underflow at byte {op_pos}")),
        }
    }

    fn pop_mark(&mut self, op_pos: usize) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Slot::Value(v)) => items.push(v),
                Some(Slot::Mark) => {
                    items.reverse();
                    return Ok(items);
                }
                None => return Err(format!("no MARK for the opcode at byte {op_pos}")),
            }
        }
    }

    fn top(&mut self, op_pos: usize) -> Result<&Value, String> {
        match self.stack.last() {
            Some(Slot::Value(v)) => Ok(v),
            _ => Err(format!("no value on the stack at byte {op_pos}")),
        }
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Value(v));
    }

    fn put(&mut self, idx: usize, op_pos: usize) -> Result<(), String> {
        let v = self.top(op_pos)?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn get(&mut self, idx: usize, op_pos: usize) -> Result<(), String> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("memo key {idx} not set at byte {op_pos}"))?;
        self.push(v);
        Ok(())
    }

    fn bytes_value(&mut self, n: usize, op_pos: usize, op: u8) -> Result<Value, String> {
        Ok(Value::Bytes(Rc::from(self.take(n, op_pos, op)?)))
    }

    fn str_value(&mut self, n: usize, op_pos: usize, op: u8) -> Result<Value, String> {
        let b = self.take(n, op_pos, op)?;
        let s = std::str::from_utf8(b).map_err(|e| format!("bad UTF-8 at byte {op_pos}: {e}"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn line(&mut self, op_pos: usize, op: u8) -> Result<Rc<str>, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            format!("truncated pickle: opcode 0x{op:02x} at byte {op_pos} has no line end")
        })?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|e| format!("bad text at byte {op_pos}: {e}"))?;
        self.pos += n + 1;
        Ok(Rc::from(s))
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op_pos = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(format!(
                    "truncated pickle: the stream ends at byte {op_pos} without a STOP opcode"
                ));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    let proto = self.uint(1, op_pos, op)?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.uint(8, op_pos, op)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(op_pos),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark(op_pos)?;
                }
                b'2' => {
                    let v = self.top(op_pos)?.clone();
                    self.push(v);
                }
                b']' => self.push(Value::List(Rc::default())),
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()))),
                b'}' => self.push(Value::Dict(Rc::default())),
                0x8f => self.push(Value::List(Rc::default())), // EMPTY_SET, read as a list
                b'l' | 0x91 => {
                    // LIST, FROZENSET
                    let items = self.pop_mark(op_pos)?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b't' => {
                    let items = self.pop_mark(op_pos)?;
                    self.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {op_pos}"));
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(op_pos)?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::from(items)));
                }
                b'd' => {
                    let items = self.pop_mark(op_pos)?;
                    let pairs = items
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop(op_pos)?]
                    } else {
                        self.pop_mark(op_pos)?
                    };
                    match self.top(op_pos)? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => {
                            return Err(format!("APPEND to {} at byte {op_pos}", other.kind()))
                        }
                    }
                }
                0x90 => {
                    // ADDITEMS (sets)
                    let items = self.pop_mark(op_pos)?;
                    if let Value::List(l) = self.top(op_pos)? {
                        l.borrow_mut().extend(items);
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop(op_pos)?;
                        let k = self.pop(op_pos)?;
                        vec![k, v]
                    } else {
                        self.pop_mark(op_pos)?
                    };
                    match self.top(op_pos)? {
                        Value::Dict(d) => d.borrow_mut().extend(
                            items
                                .chunks(2)
                                .filter(|c| c.len() == 2)
                                .map(|c| (c[0].clone(), c[1].clone())),
                        ),
                        other => {
                            return Err(format!("SETITEM on {} at byte {op_pos}", other.kind()))
                        }
                    }
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4, op_pos, op)? as u32 as i32;
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.uint(1, op_pos, op)?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2, op_pos, op)?;
                    self.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.uint(1, op_pos, op)? as usize;
                    let b = self.take(n, op_pos, op)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes at byte {op_pos}"));
                    }
                    let mut v = 0i64;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8, op_pos, op)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Value::Float(v));
                }
                // Python-2 str: raw bytes.
                b'T' => {
                    let n = self.uint(4, op_pos, op)? as u32 as i32;
                    if n < 0 {
                        return Err(format!("negative BINSTRING length at byte {op_pos}"));
                    }
                    let v = self.bytes_value(n as usize, op_pos, op)?;
                    self.push(v);
                }
                b'U' | b'C' => {
                    let n = self.uint(1, op_pos, op)? as usize;
                    let v = self.bytes_value(n, op_pos, op)?;
                    self.push(v);
                }
                b'B' => {
                    let n = self.uint(4, op_pos, op)? as usize;
                    let v = self.bytes_value(n, op_pos, op)?;
                    self.push(v);
                }
                0x8e | 0x96 => {
                    let n = self.uint(8, op_pos, op)? as usize;
                    let v = self.bytes_value(n, op_pos, op)?;
                    self.push(v);
                }
                b'X' => {
                    let n = self.uint(4, op_pos, op)? as usize;
                    let v = self.str_value(n, op_pos, op)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.uint(1, op_pos, op)? as usize;
                    let v = self.str_value(n, op_pos, op)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.uint(8, op_pos, op)? as usize;
                    let v = self.str_value(n, op_pos, op)?;
                    self.push(v);
                }
                b'q' => {
                    let i = self.uint(1, op_pos, op)? as usize;
                    self.put(i, op_pos)?;
                }
                b'r' => {
                    let i = self.uint(4, op_pos, op)? as usize;
                    self.put(i, op_pos)?;
                }
                0x94 => {
                    let i = self.memo.len();
                    self.put(i, op_pos)?;
                }
                b'h' => {
                    let i = self.uint(1, op_pos, op)? as usize;
                    self.get(i, op_pos)?;
                }
                b'j' => {
                    let i = self.uint(4, op_pos, op)? as usize;
                    self.get(i, op_pos)?;
                }
                b'c' => {
                    let module = self.line(op_pos, op)?;
                    let name = self.line(op_pos, op)?;
                    self.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop(op_pos)?;
                    let module = self.pop(op_pos)?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                        _ => return Err(format!("STACK_GLOBAL without names at byte {op_pos}")),
                    }
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ
                    let args = self.pop(op_pos)?;
                    let callable = self.pop(op_pos)?;
                    let v = reduce(callable, args).map_err(|e| format!("{e} at byte {op_pos}"))?;
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop(op_pos)?;
                    let resolved = match self.top(op_pos)? {
                        Value::Object(o) => {
                            o.borrow_mut().state = Some(state);
                            let top = Value::Object(o.clone());
                            // numpy arrays become concrete now; others stay symbolic.
                            resolve(&top).ok()
                        }
                        // dtype state (byte order etc.) does not matter for bytes.
                        Value::Dtype(_) => None,
                        other => return Err(format!("BUILD on {} at byte {op_pos}", other.kind())),
                    };
                    if let Some(v) = resolved {
                        self.pop(op_pos)?;
                        self.push(v);
                    }
                }
                _ => {
                    return Err(format!(
                        "unsupported or invalid pickle opcode 0x{op:02x} at byte {op_pos}"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tuple_of_lists() {
        // pickle.dumps(([b"ab", b"c"], [True, False]), protocol=2)
        let data = b"\x80\x02]q\x00(C\x02abq\x01C\x01cq\x02e]q\x03(\x88\x89e\x86q\x04.";
        let v = load(data).unwrap();
        let items = v.items().unwrap();
        let bins = items[0].items().unwrap();
        assert_eq!(&*bins[0].bytes().unwrap(), b"ab");
        assert_eq!(&*bins[1].bytes().unwrap(), b"c");
        assert_eq!(items[1].truths().unwrap(), vec![true, false]);
    }

    #[test]
    fn negative_long1() {
        // pickle.dumps(-2, protocol=2) == b'\x80\x02J\xfe\xff\xff\xff.'; LONG1 -300:
        let v = load(b"\x80\x02\x8a\x02\xd4\xfe.").unwrap();
        assert!(matches!(v, Value::Int(-300)));
        let v = load(b"\x80\x02J\xfe\xff\xff\xff.").unwrap();
        assert!(matches!(v, Value::Int(-2)));
    }

    #[test]
    fn unknown_global_is_kept_symbolic_and_rejected_as_bytes() {
        let v =
            load(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.").unwrap();
        let err = v.bytes().unwrap_err();
        assert!(err.contains("os.system"), "{err}");
    }
}

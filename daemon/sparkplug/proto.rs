//! The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`, Sparkplug 3.0 §6.4), written
//! out for prost by hand: the fields lathe reads and writes, with the spec's tag numbers, so no
//! `protoc` is needed at build time. Fields lathe does not use (metadata, property sets,
//! datasets, templates) are left out; prost skips them when decoding.

/// Sparkplug data types (spec §6.4.16) lathe reads or writes.
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    Int(u32),
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

impl Metric {
    /// A named metric with a value and its data type.
    pub fn new(name: &str, datatype: u32, value: Value, timestamp: u64) -> Metric {
        Metric {
            name: Some(name.to_string()),
            alias: None,
            timestamp: Some(timestamp),
            datatype: Some(datatype),
            is_historical: None,
            is_transient: None,
            is_null: None,
            value: Some(value),
        }
    }

    /// The metric's value as a number, read as its data type says (signed integers travel
    /// as two's complement in the unsigned fields, spec §6.4.16). `None` for null, text and
    /// other non-numeric values.
    pub fn number(&self) -> Option<f64> {
        self.number_as(self.datatype.unwrap_or(0))
    }

    /// [`Metric::number`] read as data type `dt` (a DATA metric may leave its type to the BIRTH).
    pub fn number_as(&self, dt: u32) -> Option<f64> {
        if self.is_null == Some(true) {
            return None;
        }
        match self.value.as_ref()? {
            Value::Int(v) => Some(match dt {
                datatype::INT8 => f64::from(*v as u8 as i8),
                datatype::INT16 => f64::from(*v as u16 as i16),
                datatype::INT32 => f64::from(*v as i32),
                _ => f64::from(*v),
            }),
            Value::Long(v) => Some(match dt {
                datatype::INT64 => *v as i64 as f64,
                _ => *v as f64,
            }),
            Value::Float(v) => Some(f64::from(*v)),
            Value::Double(v) => Some(*v),
            Value::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::String(_) | Value::Bytes(_) => None,
        }
    }
}

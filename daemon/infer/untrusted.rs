//! Checks on a model's bytes before tract sees them. A bundle may come from anywhere (a
//! download, a push from the central server); these refuse, with a clear reason, what would
//! make tract read outside the bundle, allocate without bound, or fail in a way that names
//! nothing useful.

use tract_onnx::pb::{GraphProto, TensorProto};

/// Most bytes a model's initializers may declare.
const MAX_DECLARED_BYTES: u64 = 2 << 30;

fn element_size(data_type: i32) -> Option<u64> {
    Some(match data_type {
        2 | 3 | 9 => 1,       // uint8, int8, bool
        4 | 5 | 10 | 16 => 2, // uint16, int16, float16, bfloat16
        1 | 6 | 12 => 4,      // float, int32, uint32
        7 | 11 | 13 => 8,     // int64, double, uint64
        _ => return None,     // strings and exotic types: no size check
    })
}

/// How many values a tensor actually holds, in whichever field it uses.
fn held(t: &TensorProto, size: u64) -> u64 {
    if !t.raw_data.is_empty() {
        return t.raw_data.len() as u64 / size;
    }
    [t.float_data.len(), t.int32_data.len(), t.int64_data.len(), t.double_data.len(), t.uint64_data.len()]
        .into_iter()
        .max()
        .unwrap_or(0) as u64
}

/// # Errors
/// A reason to refuse the model.
pub fn check(graph: &GraphProto) -> Result<(), String> {
    let mut total: u64 = 0;
    for t in &graph.initializer {
        if t.data_location == Some(1) || !t.external_data.is_empty() {
            let location =
                t.external_data.iter().find(|e| e.key == "location").map(|e| e.value.as_str()).unwrap_or("?");
            return Err(format!(
                "tensor {:?} keeps its data in an external file ({location:?}); lathe serves self-contained models only",
                t.name
            ));
        }
        let Some(size) = element_size(t.data_type) else { continue };
        let declared = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| u64::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
            .ok_or_else(|| format!("tensor {:?} has an impossible shape {:?}", t.name, t.dims))?;
        let holds = held(t, size);
        if holds != declared {
            return Err(format!(
                "tensor {:?} declares {declared} values (shape {:?}) but holds {holds}",
                t.name, t.dims
            ));
        }
        total = total.saturating_add(declared.saturating_mul(size));
        if total > MAX_DECLARED_BYTES {
            return Err(format!("the model's weights declare more than {MAX_DECLARED_BYTES} bytes"));
        }
    }
    Ok(())
}

//! Checks on a model's bytes before tract sees them. A bundle may come from anywhere (a
//! download, a push from the central server); these refuse, with a clear reason, what would
//! make tract read outside the bundle, allocate without bound, or fail in a way that names
//! nothing useful.

use tract_onnx::pb::{GraphProto, TensorProto};

/// Most bytes a model's initializers may declare.
const MAX_DECLARED_BYTES: u64 = 2 << 30;
/// Most values a constant shape may ask an `Expand`, `Tile` or `ConstantOfShape` to make: 2^26
/// (256 MB of f32). Checked before tract plans the model, whose constant folding would
/// otherwise allocate them (and an 8 GB request can succeed under overcommit, then exhaust
/// the device).
const MAX_SHAPED_VALUES: u64 = 1 << 26;

/// The values of a constant numeric tensor as f64 (float, double, int32 and int64 tensors;
/// raw little-endian or typed fields): for a `Range`'s bounds and a `Resize`'s scales.
fn numbers(t: &TensorProto) -> Vec<f64> {
    let raw = |n: usize| t.raw_data.chunks_exact(n);
    match t.data_type {
        1 if !t.raw_data.is_empty() => {
            raw(4).map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        1 => t.float_data.iter().map(|&v| f64::from(v)).collect(),
        11 if !t.raw_data.is_empty() => {
            raw(8).map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])).collect()
        }
        11 => t.double_data.clone(),
        6 if !t.raw_data.is_empty() => {
            raw(4).map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect()
        }
        6 => t.int32_data.iter().map(|&v| f64::from(v)).collect(),
        7 => int64s(t).into_iter().map(|v| v as f64).collect(),
        _ => Vec::new(),
    }
}

/// The int64 values of a constant tensor (raw little-endian or `int64_data`).
fn int64s(t: &TensorProto) -> Vec<i64> {
    if !t.raw_data.is_empty() {
        return t
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
    }
    t.int64_data.clone()
}

/// The constant tensor named `name`: an initializer or a `Constant` node's value.
fn constant<'g>(graph: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
    graph.initializer.iter().find(|t| t.name == name).or_else(|| {
        graph
            .node
            .iter()
            .find(|n| n.op_type == "Constant" && n.output.iter().any(|o| o == name))
            .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
            .and_then(|a| a.t.as_ref())
    })
}

/// What is known of a shape input before the model runs: its constant values, or, for a
/// `Concat` of constants and computed parts (how exporters build a shape from the batch
/// size), the constants with `None` for each computed part.
fn known_shape(graph: &GraphProto, name: &str) -> Option<Vec<Option<i64>>> {
    if let Some(t) = constant(graph, name) {
        return Some(int64s(t).into_iter().map(Some).collect());
    }
    let concat = graph.node.iter().find(|n| n.op_type == "Concat" && n.output.iter().any(|o| o == name))?;
    let parts = concat.input.iter().map(|i| match constant(graph, i) {
        Some(t) => int64s(t).into_iter().map(Some).collect(),
        None => vec![None], // computed at run time: at least 1 when the shape is valid
    });
    Some(parts.flatten().collect())
}

/// Refuses an `Expand`, `Tile` or `ConstantOfShape` whose shape (or repeats) asks for more
/// than `MAX_SHAPED_VALUES` values, or for a count past u64, from its constant parts alone.
/// A computed part counts as 1: the fuzzer found a `ConstantOfShape` of `[67108865, batch, 8]`
/// that took 2 GB at the first run.
fn check_shaped(graph: &GraphProto) -> Result<(), String> {
    for node in &graph.node {
        let input = match node.op_type.as_str() {
            "Expand" | "Tile" => 1,
            "ConstantOfShape" => 0,
            _ => continue,
        };
        let Some(values) = node.input.get(input).and_then(|name| known_shape(graph, name)) else { continue };
        let count =
            values.iter().try_fold(1u64, |acc, d| u64::try_from(d.unwrap_or(1)).ok().and_then(|d| acc.checked_mul(d)));
        let name = if node.name.is_empty() { node.output.first().map_or("", String::as_str) } else { &node.name };
        let shown: Vec<String> = values.iter().map(|d| d.map_or("?".into(), |d| d.to_string())).collect();
        let shown = format!("[{}]", shown.join(", "));
        match count {
            Some(c) if c <= MAX_SHAPED_VALUES => {}
            Some(c) => {
                return Err(format!(
                    "node {name:?} ({}) asks for {c} values (shape {shown}); the limit is {MAX_SHAPED_VALUES}",
                    node.op_type
                ))
            }
            None => {
                return Err(format!("node {name:?} ({}) has an impossible shape {shown}", node.op_type));
            }
        }
    }
    Ok(())
}

/// How many values a `Range`, `OneHot`, `Pad`, `Resize` or `Upsample` is asked for by its
/// constant inputs alone (a computed input counts as the least it can be), when that is known.
fn computed_size(graph: &GraphProto, node: &tract_onnx::pb::NodeProto) -> Option<f64> {
    let input = |i: usize| node.input.get(i).filter(|n| !n.is_empty()).and_then(|n| constant(graph, n)).map(numbers);
    let scalar = |i: usize| input(i).and_then(|v| v.first().copied());
    match node.op_type.as_str() {
        // ceil((limit - start) / delta) values.
        "Range" => {
            let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
            Some(((limit - start) / delta).ceil().max(0.0))
        }
        // depth values for every index.
        "OneHot" => scalar(1),
        // Every axis grows by its pads (the input's own size counts as 1).
        "Pad" => {
            let pads: Vec<f64> = input(1).or_else(|| {
                node.attribute.iter().find(|a| a.name == "pads").map(|a| a.ints.iter().map(|&v| v as f64).collect())
            })?;
            let axes = pads.len() / 2;
            Some((0..axes).map(|a| (1.0 + pads[a].max(0.0) + pads[a + axes].max(0.0)).max(1.0)).product())
        }
        // `sizes` as they are; `scales` times an input of at least one value per axis.
        "Resize" => input(3)
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().product())
            .or_else(|| input(2).filter(|v| !v.is_empty()).map(|v| v.iter().map(|s| s.max(1.0)).product())),
        "Upsample" => input(1).map(|v| v.iter().map(|s| s.max(1.0)).product()),
        _ => None,
    }
}

/// Refuses a node whose constant inputs ask for more than `MAX_SHAPED_VALUES` values
/// (`computed_size`): tract's constant folding, or the first run, would allocate them.
fn check_computed(graph: &GraphProto) -> Result<(), String> {
    for node in &graph.node {
        let Some(count) = computed_size(graph, node) else { continue };
        if !count.is_finite() || count > MAX_SHAPED_VALUES as f64 {
            let name = if node.name.is_empty() { node.output.first().map_or("", String::as_str) } else { &node.name };
            return Err(format!(
                "node {name:?} ({}) asks for {count:.0} values from its constant inputs; the limit is {MAX_SHAPED_VALUES}",
                node.op_type
            ));
        }
    }
    Ok(())
}

/// Refuses a `Transpose` whose `perm` is not a permutation (an axis twice, or out of range):
/// tract plans such a graph and then allocates without bound (found by `fuzz/onnx`: a
/// 4 KB LSTM with `perm = [1, 2, 2]` took 2.6 GB).
fn check_transposes(graph: &GraphProto) -> Result<(), String> {
    for node in graph.node.iter().filter(|n| n.op_type == "Transpose") {
        let Some(perm) = node.attribute.iter().find(|a| a.name == "perm") else { continue };
        let mut seen = vec![false; perm.ints.len()];
        let valid = perm.ints.iter().all(|&axis| {
            usize::try_from(axis).ok().and_then(|a| seen.get_mut(a)).is_some_and(|s| !std::mem::replace(s, true))
        });
        if !valid {
            let name = if node.name.is_empty() { node.output.first().map_or("", String::as_str) } else { &node.name };
            return Err(format!("node {name:?} (Transpose) has perm {:?}, which is not a permutation", perm.ints));
        }
    }
    Ok(())
}

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
    check_shaped(graph)?;
    check_computed(graph)?;
    check_transposes(graph)?;
    check_trees(graph)?;
    // The bodies of `If`, `Loop` and `Scan` (and any graph-valued attribute) are graphs too,
    // checked the same way: a hostile node hidden in a branch runs all the same.
    for node in &graph.node {
        for attribute in &node.attribute {
            for body in attribute.g.iter().chain(&attribute.graphs) {
                check(body).map_err(|e| {
                    format!("in the {:?} body of node {:?} ({}): {e}", attribute.name, node.name, node.op_type)
                })?;
            }
        }
    }
    Ok(())
}

/// Most classes (or regression targets) a tree ensemble may have: each is a column of every
/// row's scores.
const MAX_TREE_CLASSES: usize = 1 << 16;

/// Refuses a tree ensemble that tract would walk out of bounds or for ever. tract evaluates
/// trees with unchecked indexing (`tract-onnx-opl`, `ml/tree.rs`): a child id past its tree,
/// or a leaf's vote for a class past the last, reads or writes outside its arrays, which no
/// `catch_unwind` stops; a cycle never ends. Exporters write trees whose node ids run 0..n,
/// whose children lie in the same tree, and that end in leaves: that is what is accepted.
fn check_trees(graph: &GraphProto) -> Result<(), String> {
    for node in &graph.node {
        let (votes, classes) = match node.op_type.as_str() {
            "TreeEnsembleClassifier" => ("class_ids", None),
            "TreeEnsembleRegressor" => ("target_ids", Some("n_targets")),
            _ => continue,
        };
        let ints = |name: &str| node.attribute.iter().find(|a| a.name == name).map_or(&[][..], |a| a.ints.as_slice());
        let attribute = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let name = if node.name.is_empty() { node.output.first().map_or("", String::as_str) } else { &node.name };
        let refuse = |why: String| Err(format!("node {name:?} ({}) {why}", node.op_type));
        let classes = match classes {
            Some(targets) => attribute(targets).map_or(1, |a| a.i),
            None => {
                (ints("classlabels_int64s").len() + attribute("classlabels_strings").map_or(0, |a| a.strings.len()))
                    as i64
            }
        };
        if !(1..=MAX_TREE_CLASSES as i64).contains(&classes) {
            return refuse(format!("has {classes} classes or targets; 1 to {MAX_TREE_CLASSES} are served"));
        }
        if let Some(&vote) = ints(votes).iter().find(|&&c| !(0..classes).contains(&c)) {
            return refuse(format!("has a leaf voting for class or target {vote} of {classes}"));
        }
        let (trees, ids, yes, no) =
            (ints("nodes_treeids"), ints("nodes_nodeids"), ints("nodes_truenodeids"), ints("nodes_falsenodeids"));
        let modes = attribute("nodes_modes").map_or(&[][..], |a| a.strings.as_slice());
        let n = trees.len();
        if [ids.len(), yes.len(), no.len(), modes.len()].iter().any(|&len| len != n) {
            return refuse("has node attributes of different lengths".into());
        }
        // Each tree's nodes: (node id, its (true child, false child), None for a leaf).
        let mut by_tree: std::collections::BTreeMap<i64, Vec<TreeNode>> = Default::default();
        for i in 0..n {
            let children = (modes[i].as_slice() != b"LEAF").then_some((yes[i], no[i]));
            by_tree.entry(trees[i]).or_default().push((ids[i], children));
        }
        for (tree, mut nodes) in by_tree {
            nodes.sort_by_key(|&(id, _)| id);
            if nodes.iter().enumerate().any(|(i, &(id, _))| id != i as i64) {
                return refuse(format!("tree {tree}: node ids are not 0, 1, 2, … each once"));
            }
            let inside = |c: i64| usize::try_from(c).ok().filter(|&c| c < nodes.len());
            let mut children = Vec::with_capacity(nodes.len());
            for &(id, branch) in &nodes {
                children.push(match branch {
                    None => None,
                    Some((t, f)) => match (inside(t), inside(f)) {
                        (Some(t), Some(f)) => Some((t, f)),
                        _ => return refuse(format!("tree {tree}: node {id} has a child outside the tree")),
                    },
                });
            }
            if let Some(id) = cycle(&children) {
                return refuse(format!("tree {tree}: node {id} leads back to itself"));
            }
        }
    }
    Ok(())
}

/// A tree node as exported: its id, and its (true, false) children unless it is a leaf.
type TreeNode = (i64, Option<(i64, i64)>);

/// A node from which the walk can come back to it, if any (depth-first, without recursion).
fn cycle(children: &[Option<(usize, usize)>]) -> Option<usize> {
    // 0: not seen, 1: on the current path, 2: every path below it ends in a leaf.
    let mut state = vec![0u8; children.len()];
    for root in 0..children.len() {
        if state[root] != 0 {
            continue;
        }
        let mut stack = vec![(root, 0u8)];
        state[root] = 1;
        while let Some(top) = stack.last_mut() {
            let (node, next) = *top;
            top.1 += 1;
            let child = match (children[node], next) {
                (Some((t, _)), 0) => Some(t),
                (Some((_, f)), 1) => Some(f),
                _ => None,
            };
            match child {
                Some(c) if state[c] == 1 => return Some(c),
                Some(c) if state[c] == 0 => {
                    state[c] = 1;
                    stack.push((c, 0));
                }
                Some(_) => {}
                None => {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }
    None
}

use std::collections::HashMap;

/// A bijection between names (entity or relation keys) and dense ids `0..len`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vocab {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_names<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut v = Self::new();
        for n in names {
            v.intern(&n);
        }
        v
    }

    /// Id of `name`, adding it if new.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

//! The model's own Jinja chat template (minijinja) and parsing of generated text into thinking / content / tool calls. (Being written.)

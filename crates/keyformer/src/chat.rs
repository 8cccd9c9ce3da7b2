//! Chat prompts rendered from the model's own `tokenizer.chat_template` (Jinja, via
//! minijinja with Python-compatible string methods, as Hugging Face renders them).

use minijinja::{context, Environment};
use serde::Serialize;

use crate::ModelError;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Render `messages` with `template`, ending with the assistant's generation prompt.
pub fn render(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String, ModelError> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Templates call raise_exception("...") to reject bad conversations.
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| ModelError::Template(e.to_string()))?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(
                context! { messages => messages, add_generation_prompt => true, bos_token => bos, eos_token => eos },
            )
        })
        .map_err(|e| ModelError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template() {
        let t = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(t, &[ChatMessage { role: "user".into(), content: " hi ".into() }], "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_broken_template_is_an_error() {
        assert!(render("{% for %}", &[], "", "").is_err());
    }
}

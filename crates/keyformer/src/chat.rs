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

/// Render `messages` with `template`, ending with the assistant's generation prompt. A template
/// that drops system messages (Phi-3's) or refuses them (Gemma 2's, Mistral's) gets the system
/// text at the head of the first user turn instead (as Gemma 3's template does itself), so a
/// system prompt is never lost.
pub fn render(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String, ModelError> {
    let system: Vec<&ChatMessage> = messages.iter().filter(|m| m.role == "system").collect();
    let first = render_as_is(template, messages, bos, eos);
    match &first {
        _ if system.is_empty() => return first,
        Ok(text) if system.iter().all(|m| text.contains(m.content.as_str())) => return first,
        _ => {}
    }
    let head = system.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
    let mut merged: Vec<ChatMessage> = messages.iter().filter(|m| m.role != "system").cloned().collect();
    match merged.iter_mut().find(|m| m.role == "user") {
        Some(user) => user.content = format!("{head}\n\n{}", user.content),
        None => merged.insert(0, ChatMessage { role: "user".into(), content: head }),
    }
    // If the merged conversation fails too, the template's own complaint is the clearer one.
    render_as_is(template, &merged, bos, eos).or(first)
}

fn render_as_is(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String, ModelError> {
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
    fn a_template_without_system_turns_gets_the_system_text_in_the_first_user_turn() {
        // Users and assistants only, as Phi-3's template.
        let t = "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}<|assistant|>\n";
        let messages = [
            ChatMessage { role: "system".into(), content: "Be brief.".into() },
            ChatMessage { role: "user".into(), content: "Hi".into() },
        ];
        assert_eq!(render(t, &messages, "", "").unwrap(), "<|user|>\nBe brief.\n\nHi<|end|>\n<|assistant|>");
        // A template that keeps the system turn is left as it is.
        // A template that refuses system turns (as Gemma 2's does) gets the same treatment.
        let refusing = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}<u>{{ m['content'] }}</u>{% endfor %}";
        assert_eq!(render(refusing, &messages, "", "").unwrap(), "<u>Be brief.\n\nHi</u>");
        let chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";
        assert!(render(chatml, &messages, "", "").unwrap().starts_with("<|im_start|>system\nBe brief."));
    }

    #[test]
    fn a_broken_template_is_an_error() {
        assert!(render("{% for %}", &[], "", "").is_err());
    }
}

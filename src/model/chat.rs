//! Chat templates: the model's own Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`, the `bos_token` / `eos_token` variables).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".to_owned(),
            content: content.into(),
        }
    }
}

/// A model's chat template with the special-token strings it refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` as the template sees it.
    pub bos_token: String,
    /// `eos_token` as the template sees it.
    pub eos_token: String,
}

impl ChatTemplate {
    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let template = env
            .template_from_str(&self.source)
            .map_err(|err| Error::ChatTemplate(err.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|err| Error::ChatTemplate(err.to_string()))
    }

    /// Renders one user message followed by the generation prompt.
    pub fn render_user(&self, prompt: &str) -> Result<String> {
        self.render(&[ChatMessage::user(prompt)], true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_python_methods_and_trimmed_blocks() {
        let template = ChatTemplate {
            source: "{% for m in messages %}\n<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".to_owned(),
            bos_token: "<s>".to_owned(),
            eos_token: "</s>".to_owned(),
        };
        let text = template.render_user("  hi  ").unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let template = ChatTemplate {
            source: "{{ raise_exception('only user turns') }}".to_owned(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let err = template.render_user("x").unwrap_err();
        assert!(err.to_string().contains("only user turns"), "{err}");
    }
}

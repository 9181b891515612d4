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

    /// A template written in the style of Gemma's (turn markers, the system turn folded into
    /// the first user turn, `assistant` renamed `model`, `messages[1:]`, `is string`, `| trim`,
    /// whitespace control, `loop.first`): the same text as transformers' Jinja renderer gives
    /// (checked with jinja2 3.1 and transformers' environment settings).
    #[test]
    fn renders_a_gemma_style_template_as_transformers_does() {
        let template = ChatTemplate {
            source: GEMMA_STYLE.to_owned(),
            bos_token: "<bos>".to_owned(),
            eos_token: "<eos>".to_owned(),
        };
        let turn = |role: &str, content: &str| ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        };
        let messages = [
            turn("system", " Be brief. "),
            turn("user", "  Name a colour. "),
            turn("assistant", "Blue."),
            turn("user", "Another?"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            template.render_user("  Name a colour. ").unwrap(),
            "<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
        );
        let err = template
            .render(&[turn("assistant", "x")], true)
            .unwrap_err();
        assert!(err.to_string().contains("must alternate"), "{err}");
    }

    const GEMMA_STYLE: &str = r"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set prefix = messages[0]['content'] | trim ~ '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('turns must alternate user/assistant') }}
{%- endif -%}
{%- set speaker = 'model' if m['role'] == 'assistant' else m['role'] -%}
{{ '<start_of_turn>' ~ speaker ~ '\n' ~ (prefix if loop.first else '') }}
{%- if m['content'] is string -%}
{{ m['content'] | trim }}
{%- endif -%}
{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
";
}

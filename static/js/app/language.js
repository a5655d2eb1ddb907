// The conversation's language: the text box and each transcript line carry it as their HTML lang.

import { ui } from "./dom.js";
import { avatarCall } from "./state.js";

// The HTML lang for a conversation language. The server writes Mandarin in simplified characters
// (it converts Whisper's traditional ones), and "zh-Hans" makes the browser pick simplified-Chinese
// glyphs and Chinese line breaking; a bare "zh" leaves the font choice to the browser's locale.
export function htmlLang(language) {
  return language === "zh" ? "zh-Hans" : language;
}

export function setLanguage(language) {
  if (typeof language !== "string" || !language) return;
  avatarCall.language = language;
  ui.text.lang = htmlLang(language);
}

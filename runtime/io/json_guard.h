// Parsing JSON from files moex did not write (config.json, safetensors headers, checkpoint indexes)
// without trusting its shape: nesting depth bounded before anything recurses over it, duplicate keys
// (which a DOM parser silently merges) refused, all in time linear in the text.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace moex {

/// Nesting deeper than this is refused (DeepSeek's files nest 3 deep at most).
inline constexpr int kMaxJsonDepth = 64;

/// Parses `text` (named `what` in errors) after a linear scan that refuses nesting deeper than
/// `max_depth` and a key given twice in one object. Throws IoError "WHAT: ..." naming the problem
/// (the key, the depth, or the parser's message with its byte position).
nlohmann::json parse_json_guarded(const std::string& text, const std::string& what, int max_depth = kMaxJsonDepth);

}  // namespace moex

// parse_json_guarded: a SAX pass (depth, duplicate keys), then the DOM parse.
#include "runtime/io/json_guard.h"

#include <set>
#include <vector>

#include "base/error.h"

namespace moex {
namespace {

using json = nlohmann::json;

/// Counts depth and watches each object's keys; stops at the first problem.
struct Scan : nlohmann::json_sax<json> {
  int max_depth;
  int depth = 0;
  std::vector<std::set<std::string>> keys;  // one per open object (arrays push nothing)
  std::vector<bool> is_object;
  std::string problem;
  explicit Scan(int d) : max_depth(d) {}

  bool open(bool object) {
    if (++depth > max_depth) {
      problem = "nested deeper than " + std::to_string(max_depth) + " levels";
      return false;
    }
    is_object.push_back(object);
    if (object) keys.emplace_back();
    return true;
  }
  bool close() {
    --depth;
    if (!is_object.empty()) {
      if (is_object.back()) keys.pop_back();
      is_object.pop_back();
    }
    return true;
  }
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return open(true); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(false); }
  bool end_array() override { return close(); }
  bool key(string_t& k) override {
    if (!keys.empty() && !keys.back().insert(k).second) {
      problem = "key '" + k + "' appears twice in one object";
      return false;
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    problem = std::string("not valid JSON: ") + e.what();
    return false;
  }
};

}  // namespace

json parse_json_guarded(const std::string& text, const std::string& what, int max_depth) {
  Scan scan(max_depth);
  const bool ok = json::sax_parse(text, &scan, json::input_format_t::json, true, false);
  if (!ok || !scan.problem.empty())
    throw IoError(what + ": " + (scan.problem.empty() ? std::string("not valid JSON") : scan.problem));
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw IoError(what + ": not valid JSON: " + e.what());
  }
}

}  // namespace moex

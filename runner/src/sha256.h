// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex: the runner checks the artifact's files against the
// sha256 values the manifest records, as llmpress.load() does.
#pragma once

#include <string>

namespace llmpress {

std::string Sha256Hex(const std::string& data);

}  // namespace llmpress

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title OpenToken
/// @notice Devnet stand-in for the OPEN token: a plain ERC-20 with EIP-2612 `permit` whose owner can mint.
/// On a real network the existing OPEN token address is configured instead; no other contract depends on
/// anything but the ERC-20 interface.
contract OpenToken is ERC20, ERC20Permit, Ownable {
    /// @param initialOwner Account allowed to mint (the devnet faucet).
    constructor(address initialOwner) ERC20("OpenLoRA Token", "OPEN") ERC20Permit("OpenLoRA Token") Ownable(initialOwner) {}

    /// @notice Mints `amount` tokens to `to`. Only the owner (devnet faucet) can mint.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
